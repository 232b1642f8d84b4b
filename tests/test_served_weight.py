"""Each merchant's served popularity weight (`fedrec/served_weight.py`): chosen on its own
validation slice under a top-1 share budget, written with its export, read by the server."""

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec import served_weight
from fedrec.config import load_config
from fedrec.data import MerchantData
from fedrec.errors import ConfigError
from fedrec.evaluation import evaluate_val
from fedrec.features import build_item_features
from fedrec.federated.local import LocalConfig
from fedrec.federated.merchant_node import write_merchant_export
from fedrec.federated.simulation import FederationConfig, run_federated
from fedrec.model import ModelConfig, item_embeddings
from fedrec.privacy.accountant import plan_mechanism
from fedrec.privacy.config import PrivacyConfig
from fedrec.serving.export_store import SERVED_WEIGHT_FILE, load_merchant

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def random_merchant(seed: int = 0, n_users: int = 80, n_items: int = 120):
    """A shop whose bias puts a few products on top for everyone and whose validation purchases
    follow partly the bias and partly the customers' own vectors: so both recall and the top-1
    share move with w."""
    rng = np.random.default_rng(seed)
    users = torch.from_numpy(rng.normal(size=(n_users, 8)).astype(np.float32))
    items = torch.from_numpy(rng.normal(size=(n_items, 8)).astype(np.float32))
    bias = torch.from_numpy((8.0 * np.exp(-np.arange(n_items) / 3.0)).astype(np.float32))
    taste = (users @ items.T).numpy()
    cols = np.concatenate([rng.choice(np.arange(10, n_items), 3, replace=False) for _ in range(n_users)])
    rows = np.repeat(np.arange(n_users), 3)
    train = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), (n_users, n_items))
    own = np.argsort(-np.where(train.toarray() > 0, -np.inf, taste), axis=1)[:, 0]
    popular = rng.integers(0, 3, n_users)
    val_cols = np.where(rng.random(n_users) < 0.4, popular, own)
    val = sp.csr_matrix((np.ones(n_users, np.float32), (np.arange(n_users), val_cols)), (n_users, n_items))
    empty = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    return MerchantData("shop", np.arange(n_users), train, val, empty), users, items, bias


def brute_force(m, users, items, bias):
    """Each candidate's validation recall@20 (early stopping's own function) and top-1 share."""
    out = {}
    for w in WEIGHTS:
        val = evaluate_val(m, users, items, w * bias)
        scores = (users @ items.T + w * bias).numpy()
        scores[m.train.toarray() > 0] = -np.inf
        eligible = m.val.getnnz(axis=1) > 0
        top1 = scores[eligible].argmax(axis=1)
        out[w] = (val.sums["recall@20"] / val.users, np.bincount(top1).max() / eligible.sum())
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_choice_is_the_best_recall_within_the_top1_budget(seed):
    m, users, items, bias = random_merchant(seed)
    truth = brute_force(m, users, items, bias)
    shares = sorted(s for _, s in truth.values())
    assert truth[1.0][1] > truth[0.0][1], "the bias must concentrate the lists for this test to mean anything"
    for budget in (1.0, shares[len(shares) // 2], shares[0]):
        chosen = served_weight.choose(m, users, items, bias, WEIGHTS, budget)
        within = {w: r for w, (r, s) in truth.items() if s <= budget}
        best = max(within.values())
        assert truth[chosen.weight][1] <= budget
        assert truth[chosen.weight][0] == pytest.approx(best)
        assert chosen.weight == max(w for w, r in within.items() if r == pytest.approx(best))  # ties: larger w
        for w, row in chosen.validation.items():
            assert row["recall@20"] == pytest.approx(truth[w][0])
            assert row["top1_share"] == pytest.approx(truth[w][1])


def test_an_unmeetable_budget_takes_the_least_concentrated_weight():
    m, users, items, bias = random_merchant(3)
    truth = brute_force(m, users, items, bias)
    least = min(s for _, s in truth.values())
    chosen = served_weight.choose(m, users, items, bias, WEIGHTS, least / 2)
    assert truth[chosen.weight][1] == pytest.approx(least)


def test_nothing_is_chosen_without_a_bias_candidates_or_validation():
    m, users, items, bias = random_merchant(0)
    assert served_weight.choose(m, users, items, None, WEIGHTS, 0.2) is None
    assert served_weight.choose(m, users, items, bias, (), 0.2) is None
    no_val = dataclasses.replace(m, val=sp.csr_matrix(m.val.shape, dtype=np.float32))
    assert served_weight.choose(no_val, users, items, bias, WEIGHTS, 0.2) is None


def test_served_biases_scale_only_the_merchants_that_chose():
    chosen = served_weight.ServedWeight(0.5, 0.2, {})
    biases = {"a": torch.ones(3), "b": torch.ones(3), "c": None}
    out = served_weight.served_biases(biases, {"a": chosen})
    torch.testing.assert_close(out["a"], torch.full((3,), 0.5))
    assert out["b"] is biases["b"] and out["c"] is None


MODEL = ModelConfig(dim=8, feature_dim=8, hidden=16, hash_buckets=512, merchant_item_bias=True)
LOCAL = LocalConfig(batch_size=128, temperature=1.0)
FED = FederationConfig(rounds=3, patience=0, refit=False, seed=0)


@pytest.fixture(scope="module")
def features(tiny_dataset):
    return build_item_features(tiny_dataset.items, MODEL.hash_buckets)


def test_a_run_chooses_each_merchants_weight_on_its_early_stopped_model(tiny_dataset, features):
    res = run_federated(tiny_dataset, features, MODEL, LOCAL, FED)
    assert set(res.served_weights) == {m.name for m in tiny_dataset.merchants}
    for m in tiny_dataset.merchants:
        expected = served_weight.choose(
            m, res.user_embeddings[m.name], item_embeddings(res.item_state, features, MODEL), res.item_biases[m.name],
            MODEL.served_popularity_weights, MODEL.max_top1_share,
        )  # fmt: skip
        assert res.served_weights[m.name] == expected
    # the trained biases are kept: the weight applies when serving and in `make evaluate` only
    assert all(b is not None and b.abs().sum() > 0 for b in res.item_biases.values())


def test_no_choice_under_dp_without_a_bias_or_without_candidates(tiny_dataset, features):
    off = run_federated(tiny_dataset, features, dataclasses.replace(MODEL, served_popularity_weights=()), LOCAL, FED)
    assert off.served_weights is None
    plain = run_federated(tiny_dataset, features, dataclasses.replace(MODEL, merchant_item_bias=False), LOCAL, FED)
    assert plain.served_weights is None
    dp = plan_mechanism(PrivacyConfig(epsilon=8.0), 3, 1)
    private = run_federated(tiny_dataset, features, MODEL, LOCAL, FED, dp=dp)
    assert private.served_weights is None


def test_the_export_carries_the_weight_to_the_server(tiny_dataset, tmp_path):
    m = tiny_dataset.merchants[0]
    users = torch.zeros(m.n_users, 4)
    bias = torch.linspace(0, 1, m.train.shape[1])
    entry = served_weight.ServedWeight(0.6, 0.2, {0.6: {"recall@20": 0.3, "top1_share": 0.1}}).entry()
    write_merchant_export(tmp_path / "v0001", m, users, bias, served=entry)
    assert (tmp_path / "v0001" / SERVED_WEIGHT_FILE).is_file()
    assert load_merchant(tmp_path, m.name, "v0001", m.train.shape[1], 4).popularity_weight == 0.6
    write_merchant_export(tmp_path / "v0002", m, users, bias)  # nothing chosen: the trained score
    assert load_merchant(tmp_path, m.name, "v0002", m.train.shape[1], 4).popularity_weight == 1.0


@pytest.mark.parametrize(
    ("key", "value"),
    [("model.served_popularity_weights", [0.5, 1.5]), ("model.served_popularity_weights", [True]),
     ("model.max_top1_share", 0), ("model.max_top1_share", 1.2)],
)  # fmt: skip
def test_bad_settings_are_refused(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, {key: value})
