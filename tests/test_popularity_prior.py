"""The popularity prior of large catalogues: w log(1 + buyers) added to the released scores, w
chosen on the validation slice (`fedrec/federated/popularity_prior.py`)."""

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.config import load_config
from fedrec.data import MerchantData
from fedrec.errors import ConfigError
from fedrec.features import build_item_features
from fedrec.federated import popularity_prior as prior
from fedrec.federated.local import LocalConfig
from fedrec.federated.simulation import FederationConfig, run_federated
from fedrec.model import ModelConfig
from fedrec.privacy.accountant import plan_mechanism
from fedrec.privacy.config import PrivacyConfig
from fedrec.training.train import popularity_entry

MODEL = ModelConfig(dim=8, feature_dim=8, hidden=16, hash_buckets=512)
# The tiny shop has 200 products: a switch at 50 makes it a "large" catalogue (sampled softmax).
LARGE = LocalConfig(batch_size=128, temperature=1.0, full_softmax_max_items=50)
FED = FederationConfig(rounds=3, patience=0, refit=False, seed=0)


@pytest.fixture(scope="module")
def features(tiny_dataset):
    return build_item_features(tiny_dataset.items, MODEL.hash_buckets)


def merchant(name: str, train: list[list[int]], val: list[list[int]], n_items: int) -> MerchantData:
    def csr(rows: list[list[int]]) -> sp.csr_matrix:
        m = sp.lil_matrix((len(rows), n_items), dtype=np.float32)
        for r, items in enumerate(rows):
            m[r, items] = 1.0
        return m.tocsr()

    return MerchantData(name, np.arange(len(train)), csr(train), csr(val), csr([[] for _ in train]))


def test_pooled_buyers_counts_customers_per_product_over_merchants():
    a = merchant("a", [[0, 1], [1], [1, 2]], [[3], [], [0]], 5)
    b = merchant("b", [[1, 4]], [[3]], 5)
    np.testing.assert_array_equal(prior.pooled_buyers([a, b], with_validation=False), [1, 4, 1, 0, 1])
    np.testing.assert_array_equal(prior.pooled_buyers([a, b], with_validation=True), [2, 4, 1, 2, 1])
    expected = torch.tensor([0.0, float(0.5 * np.log(4))])
    torch.testing.assert_close(prior.prior_offsets(np.array([0.0, 3.0]), 0.5), expected)


def test_offsets_add_to_every_kind_of_item_bias():
    offsets = torch.tensor([1.0, 2.0, 3.0])
    out = prior.with_offsets({"none": None, "own": torch.ones(3), "grouped": torch.zeros(2, 3)}, offsets)
    assert out["none"] is offsets  # shared, not copied per merchant
    torch.testing.assert_close(out["own"], offsets + 1)
    torch.testing.assert_close(out["grouped"], offsets.expand(2, 3))


def test_the_weight_follows_what_validation_rewards():
    """Customers whose next purchase is the best seller: validation wants the prior. Customers whose
    vectors already point at their next purchase, a product nobody bought: it wants none."""
    # 30 products: 26 (4..29) score 1 for everyone and fill the top 20; the best seller, product 0
    # (3 buyers), scores 0, so only a prior above 1 / log(4) lifts it into the list
    best_seller = merchant("p", [[1], [2], [3], [0, 1], [0, 2], [0, 3]], [[0], [0], [0], [], [], []], 30)
    items = torch.zeros(30, 2)
    items[4:, 0] = 1.0
    users = {"p": torch.tensor([[1.0, 0.0]]).expand(6, 2)}
    weight, scores = prior.choose_weight([best_seller], users, items, {"p": None}, (0.0, 0.1, 1.0, 3.0), {"p": None})
    assert scores == {0.0: 0.0, 0.1: 0.0, 1.0: 1.0, 3.0: 1.0} and weight == 1.0  # a tie keeps the earlier weight
    # 40 products: two customers point at their own validation product (30, 31), which nobody
    # bought before; two others bought products 0..24, so a large prior puts 25 best sellers above it
    niche = merchant("n", [[35], [36], list(range(25)), list(range(25))], [[30], [31], [], []], 40)
    items = torch.zeros(40, 2)
    items[30, 0] = items[31, 1] = 1.0
    users = {"n": torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])}
    weight, scores = prior.choose_weight([niche], users, items, {"n": None}, (0.0, 3.0), {"n": None})
    assert scores == {0.0: 1.0, 3.0: 0.0} and weight == 0.0


def test_an_empty_validation_slice_is_refused():
    m = merchant("m", [[0], [1]], [[], []], 3)
    with pytest.raises(ConfigError, match="validation slice, which is empty"):
        prior.choose_weight([m], {"m": torch.zeros(2, 2)}, torch.zeros(3, 2), {"m": None}, (0.0, 1.0), {"m": None})


def test_a_large_catalogue_run_adds_the_chosen_prior_and_trains_the_same_model(tiny_dataset, features):
    """Training is untouched (the prior is added afterwards); the weight-0 candidate scores what the
    released round scored; the released biases are the plain ones plus the chosen offsets."""
    plain = run_federated(tiny_dataset, features, MODEL, dataclasses.replace(LARGE, sampled_popularity_weights=()), FED)
    res = run_federated(tiny_dataset, features, MODEL, LARGE, FED)
    assert plain.popularity is None and res.popularity is not None
    for k in plain.item_state:
        torch.testing.assert_close(res.item_state[k], plain.item_state[k])
    scores = res.popularity.scores
    assert list(scores) == list(LARGE.sampled_popularity_weights)
    assert scores[0.0] == pytest.approx({h.round: h.val_recall_at_20 for h in res.history}[res.best_round])
    assert res.popularity.weight == max(scores, key=scores.get)
    buyers = prior.pooled_buyers(tiny_dataset.merchants, with_validation=False)
    for m in tiny_dataset.merchants:
        assert plain.item_biases[m.name] is None
        torch.testing.assert_close(res.item_biases[m.name], prior.prior_offsets(buyers, res.popularity.weight))
    entry = popularity_entry(res)
    assert entry["weight"] == res.popularity.weight
    assert set(entry["val_recall@20"]) == {"0.0", "0.1", "0.3", "1.0", "3.0"}


def test_the_refit_gets_the_prior_of_its_own_data_and_the_weight_of_the_early_stopped_model(tiny_dataset, features):
    res = run_federated(tiny_dataset, features, MODEL, LARGE, dataclasses.replace(FED, refit=True))
    assert res.refit_rounds > 0 and res.early_stopped.popularity.weight == res.popularity.weight
    w = res.popularity.weight
    m = tiny_dataset.merchants[0]
    whole = prior.prior_offsets(prior.pooled_buyers(tiny_dataset.merchants, with_validation=True), w)
    train = prior.prior_offsets(prior.pooled_buyers(tiny_dataset.merchants, with_validation=False), w)
    torch.testing.assert_close(res.item_biases[m.name], whole)
    torch.testing.assert_close(res.early_stopped.item_biases[m.name], train)


def test_no_prior_below_the_switch_or_under_dp(tiny_dataset, features):
    small = run_federated(tiny_dataset, features, MODEL, dataclasses.replace(LARGE, full_softmax_max_items=20_000),
                          FED)  # fmt: skip
    assert small.popularity is None and all(b is None for b in small.item_biases.values())
    dp = plan_mechanism(PrivacyConfig(epsilon=8.0), 2, 1)
    private = run_federated(tiny_dataset, features, MODEL, LARGE, dataclasses.replace(FED, rounds=2), dp=dp)
    assert private.popularity is None
    assert not prior.applies(LARGE, 200, private=True) and prior.applies(LARGE, 200, private=False)


def test_settings_and_the_networked_messages():
    assert load_config(None, {"local.sampled_popularity_weights": []}).local.sampled_popularity_weights == ()
    for bad in ([-1.0], [float("inf")], ["high"], [True]):
        with pytest.raises(ConfigError, match="local.sampled_popularity_weights must be"):
            load_config(None, {"local.sampled_popularity_weights": bad})
    # what a merchant sends for it: two count vectors, then a hits-and-customers pair per weight
    assert prior.buyer_names(7) == {prior.BUYERS: (7,), prior.BUYERS_FULL: (7,)}
    assert sorted(prior.candidate_names((0.0, 3.0))) == [
        "prior/0/val/recall@20", "prior/0/val/users", "prior/1/val/recall@20", "prior/1/val/users",
    ]  # fmt: skip
    a = merchant("a", [[0, 1], [1]], [[3], [0]], 5)
    sums = prior.merchant_buyers(a)
    np.testing.assert_array_equal(sums[prior.BUYERS].numpy(), [1, 2, 0, 0, 0])
    np.testing.assert_array_equal(sums[prior.BUYERS_FULL].numpy(), [2, 2, 0, 1, 0])
