"""privacy.mechanism = 'als': ALS's item step from clipped, noised sums (DP-ALS).

What the guarantee rests on, each checked so that it fails if it stops being true: one customer's
part of a merchant's scaled sums is at most 1 in L2 (whatever their vector and however much
they bought), the noise has the configured scale, the accountant composes one unsampled Gaussian
release a round as Opacus does, and a merchant's message holds only the noised sums and public
weights.
"""

import dataclasses
import math
import re

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant

from fedrec.config import aggregation_rule, load_config
from fedrec.errors import ConfigError
from fedrec.features import build_item_features
from fedrec.federated.aggregation import ALS_DP, sum_names
from fedrec.federated.local import LocalConfig, local_update
from fedrec.federated.simulation import FederationConfig, run_federated
from fedrec.model import ModelConfig, initial_item_state, item_tower_shapes
from fedrec.privacy import noisy_als
from fedrec.privacy.accountant import DPMechanism, epsilon_spent, plan_mechanism
from fedrec.privacy.config import PrivacyConfig

MODEL = ModelConfig(dim=8, use_content=False, hash_buckets=64)
LOCAL = LocalConfig(loss="ials", temperature=1.0, ials_alpha=5.0, user_solve_reg=3.0, ials_item_step="exact")
PRIVATE = {"local.loss": "ials", "local.temperature": 1.0, "local.ials_item_step": "exact", "model.use_content": False,
           "privacy.mechanism": "als", "privacy.epsilon": 8.0}  # fmt: skip


def _scaled(terms: dict, clip: float, max_purchases: float, count_share: float = 0.0) -> np.ndarray:
    """The release as the Gaussian mechanism sees it: each block over its scale, the Gram's upper
    triangle, and the merchant's counts when they have a share."""
    s_rhs, s_gram, s_counts = noisy_als.block_scales(clip, max_purchases, count_share)
    gram = terms[noisy_als.GRAM][np.triu_indices(terms[noisy_als.GRAM].shape[0])]
    counts = terms[noisy_als.COUNTS] / s_counts if count_share else np.zeros(0)
    return np.concatenate([terms[noisy_als.RHS].ravel() / s_rhs, gram / s_gram, counts])


@settings(max_examples=60, deadline=None)
@given(
    customers=st.integers(1, 10),
    items=st.integers(2, 30),
    dim=st.integers(1, 6),
    clip=st.floats(0.01, 5.0),
    max_purchases=st.floats(0.5, 20.0),
    scale=st.floats(1e-3, 1e3),
    quantity=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    count_share=st.sampled_from([0.0, 0.3, 0.9]),
)
def test_one_customer_moves_a_merchants_scaled_sums_by_at_most_one(
    customers, items, dim, clip, max_purchases, scale, quantity, seed, count_share
):
    rng = np.random.default_rng(seed)
    users = rng.normal(size=(customers, dim)) * scale
    # any number of purchases per customer (none included), quantities above 1 included, and the same
    # product stored twice for a customer (a matrix whose duplicates were never summed)
    bought = (rng.random((customers, items)) < rng.random((customers, 1))).astype(float) * quantity
    purchases = sp.csr_matrix(bought)
    rows, cols = bought.nonzero()
    if quantity > 1 and len(rows):
        twice = np.concatenate([np.arange(len(rows)), [0, 0]])  # the first purchase stored three times
        # built from raw arrays: a coo -> csr conversion would sum the duplicates
        order = np.argsort(rows[twice], kind="stable")
        indptr = np.concatenate([[0], np.cumsum(np.bincount(rows[twice], minlength=customers))])
        purchases = sp.csr_matrix((np.ones(len(twice)), cols[twice][order], indptr), shape=bought.shape)
        assert not purchases.has_canonical_format
    full = _scaled(noisy_als.clipped_terms(users, purchases, clip, max_purchases), clip, max_purchases, count_share)
    for c in range(customers):
        keep = np.arange(customers) != c
        # the others' vectors do not depend on customer c (each is solved from its own purchases)
        rest = noisy_als.clipped_terms(users[keep], purchases[keep], clip, max_purchases)
        diff = np.linalg.norm(full - _scaled(rest, clip, max_purchases, count_share))
        assert diff <= 1.0 + 1e-9
        distinct = len(np.unique(purchases[c].indices))
        if distinct and np.linalg.norm(users[c]) >= clip and distinct >= max_purchases:
            assert diff > 0.5  # the bound is not loose: a heavy buyer at the clip uses most of it


def test_noise_has_the_configured_scale_and_the_gram_stays_symmetric():
    clip, m, std = 0.05, 2.0, 1.3
    terms = {noisy_als.RHS: np.zeros((20_000, 8)), noisy_als.GRAM: np.zeros((8, 8))}
    noisy = noisy_als.noised_terms(terms, clip, m, std, torch.Generator().manual_seed(0))
    s_rhs, s_gram, _ = noisy_als.block_scales(clip, m)
    assert noisy[noisy_als.RHS].std().item() == pytest.approx(std * s_rhs, rel=0.01)
    gram = noisy[noisy_als.GRAM]
    assert torch.equal(gram, gram.T) and gram.abs().min() > 0
    grams = torch.stack([
        noisy_als.noised_terms(terms, clip, m, std, torch.Generator().manual_seed(s))[noisy_als.GRAM]
        for s in range(400)
    ])  # fmt: skip
    assert grams.std(0).mean().item() == pytest.approx(std * s_gram, rel=0.05)
    # the shares add to one sensitivity: 0.95 of it to the per-product sums
    assert (clip * math.sqrt(m) / s_rhs) ** 2 + (clip * clip / s_gram) ** 2 == pytest.approx(1.0)


def test_the_merchants_counts_take_their_share_of_the_sensitivity_and_their_own_noise():
    clip, m, std, share = 0.05, 2.0, 1.3, 0.3
    s_rhs, s_gram, s_counts = noisy_als.block_scales(clip, m, share)
    parts = ((clip * math.sqrt(m) / s_rhs) ** 2, (clip * clip / s_gram) ** 2, (math.sqrt(m) / s_counts) ** 2)
    assert sum(parts) == pytest.approx(1.0) and parts[2] == pytest.approx(share)
    terms = {noisy_als.COUNTS: np.full(20_000, 7.0)}
    counts = noisy_als.noised_counts(terms, clip, m, share, std, torch.Generator().manual_seed(0))
    assert counts.mean().item() == pytest.approx(7.0, abs=0.1)
    assert counts.std().item() == pytest.approx(std * s_counts, rel=0.02)
    assert noisy_als.block_scales(clip, m, 0.0)[2] == math.inf  # no counts block: all to the sums


def test_the_count_bias_carries_the_running_mean_of_the_releases():
    rng = np.random.default_rng(0)
    releases = [torch.from_numpy(rng.normal(50.0, 20.0, size=500)).float() for _ in range(4)]
    weight, bias = 0.1, torch.zeros(500)
    for r, fresh in enumerate(releases, start=1):
        bias = noisy_als.count_bias(noisy_als.averaged_counts(bias, fresh, weight, r), weight)
    mean = torch.stack(releases).mean(0)
    assert torch.allclose(noisy_als.bias_counts(bias, weight), mean, rtol=1e-4, atol=1e-3)
    assert torch.allclose(bias, weight * torch.sign(mean) * torch.log1p(mean.abs()), rtol=1e-5, atol=1e-6)
    # more counts, more bias; a negative noised count ranks below a zero one
    assert noisy_als.count_bias(torch.tensor([-3.0, 0.0, 2.0, 30.0]), weight).diff().gt(0).all()


def test_under_a_noise_schedule_the_count_bias_weighs_each_release_by_its_precision():
    rng = np.random.default_rng(1)
    releases = [torch.from_numpy(rng.normal(50.0, 20.0, size=500)).float() for _ in range(3)]
    weight, decay, bias = 0.1, 0.5, torch.zeros(500)
    for r, fresh in enumerate(releases, start=1):
        bias = noisy_als.count_bias(noisy_als.averaged_counts(bias, fresh, weight, r, decay), weight)
    precision = torch.tensor([decay ** (-2.0 * k) for k in range(3)])  # round t's noise: decay^(t - 1)
    want = (torch.stack(releases) * precision[:, None]).sum(0) / precision.sum()
    assert torch.allclose(noisy_als.bias_counts(bias, weight), want, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(want, torch.stack(releases).mean(0), rtol=1e-2)  # not the plain mean


def test_each_round_of_a_noise_schedule_draws_that_rounds_noise(tiny_dataset):
    """A merchant's release in round t under privacy.noise_decay is the one a flat mechanism at round
    t's noise multiplier gives: the same draws, scaled."""
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    m = tiny_dataset.merchants[0]
    state = initial_item_state(tiny_dataset.n_items, MODEL, 0)
    users = torch.zeros(m.n_users, MODEL.dim)
    scheduled = DPMechanism(0.05, 2.0, 1.0, 1, 1e-5, 8.0, mechanism="als", max_purchases=2.0, noise_decay=0.5)
    flat = dataclasses.replace(scheduled, noise_multiplier=0.5, noise_decay=1.0)  # round 3: 2 x 0.5^2
    got = local_update(state, users, m.train, features, MODEL, LOCAL, 7, dp=scheduled, release=3)
    want = local_update(state, users, m.train, features, MODEL, LOCAL, 7, dp=flat, release=3)
    first = local_update(state, users, m.train, features, MODEL, LOCAL, 7, dp=scheduled, release=1)
    for k in want.item_terms:
        assert torch.equal(got.item_terms[k], want.item_terms[k])
    clean = noisy_als.clipped_terms(got.user_embeddings.numpy(), m.train, 0.05, 2.0)[noisy_als.RHS]
    late = got.item_terms[noisy_als.RHS].double().numpy() - clean
    early = first.item_terms[noisy_als.RHS].double().numpy() - clean
    assert early.std() == pytest.approx(4 * late.std(), rel=0.1)  # round 1's noise: 2, round 3's: 0.5


def test_the_solve_is_alss_item_step_without_the_per_product_confidence_term():
    rng = np.random.default_rng(0)
    users = rng.normal(size=(30, 4)) * 0.03  # below the clip: unchanged
    purchases = sp.random(30, 12, density=0.3, random_state=1, format="csr")
    terms = noisy_als.clipped_terms(users, purchases, clip=1.0, max_purchases=100.0)  # no weight below 1
    total = {k: torch.from_numpy(v).float() for k, v in terms.items()}
    got = noisy_als.solve_item_table(total, alpha=4.0, reg=2.0).double().numpy()
    bought = (purchases > 0).astype(float).toarray()
    want = 5.0 * np.linalg.solve(users.T @ users + 2.0 * np.eye(4), (bought.T @ users).T).T
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)


def test_the_accountant_composes_one_unsampled_gaussian_release_a_round_as_opacus_does():
    cfg = PrivacyConfig(epsilon=8.0, mechanism="als", sample_rate=0.1)
    mech = plan_mechanism(cfg, rounds=3, epochs=2)
    assert (mech.sample_rate, mech.steps_per_round, mech.mechanism) == (1.0, 1, "als")  # sample_rate unused
    acc = PRVAccountant()  # the default accountant
    for _ in range(3):
        acc.step(noise_multiplier=mech.noise_multiplier, sample_rate=1.0)
    eps = acc.get_epsilon(delta=cfg.delta)
    assert eps == pytest.approx(epsilon_spent(mech, 3), rel=1e-9) and 7.9 < eps <= 8.0
    # one more round would overspend: the budget fixes the schedule
    assert epsilon_spent(mech, 4) > 8.0


def test_a_merchant_sends_only_the_noised_sums_and_public_weights(tiny_dataset):
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    m = tiny_dataset.merchants[0]
    state = initial_item_state(tiny_dataset.n_items, MODEL, 0)
    users = torch.zeros(m.n_users, MODEL.dim)
    mech = DPMechanism(0.05, 1.0, 1.0, 1, 1e-5, 8.0, mechanism="als", max_purchases=2.0)
    out = [local_update(state, users, m.train, features, MODEL, LOCAL, seed, dp=mech) for seed in (0, 0, 1)]
    names = sum_names(item_tower_shapes(tiny_dataset.n_items, MODEL), ALS_DP)
    assert set(out[0].item_terms) == {k for k in names if k.startswith("dp_als/")}
    assert (out[0].num_examples, out[0].num_steps, out[0].mean_loss) == (1, 1, 0.0)
    assert not out[0].touched_rows.any()
    # the same seed draws the same noise; another seed other noise
    assert torch.equal(out[0].item_terms[noisy_als.RHS], out[1].item_terms[noisy_als.RHS])
    assert not torch.equal(out[0].item_terms[noisy_als.RHS], out[2].item_terms[noisy_als.RHS])
    # the noise is there: the sums differ from the clipped sums by about its scale
    clean = noisy_als.clipped_terms(out[0].user_embeddings.numpy(), m.train, 0.05, 2.0)[noisy_als.RHS]
    noise = out[0].item_terms[noisy_als.RHS].double().numpy() - clean
    assert noise.std() == pytest.approx(noisy_als.block_scales(0.05, 2.0)[0], rel=0.2)
    assert out[0].item_bias is None


def test_with_a_count_bias_the_counts_stay_at_the_merchant_with_the_whole_noise(tiny_dataset):
    """Under split noise the summed blocks carry a share of the noise, the counts all of it: they are
    never summed with other merchants', and other customers' lists read the bias."""
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    m = tiny_dataset.merchants[0]
    model = ModelConfig(dim=8, use_content=False, hash_buckets=64, merchant_item_bias=True)
    state = initial_item_state(tiny_dataset.n_items, model, 0)
    users = torch.zeros(m.n_users, model.dim)
    clip, cap, sigma, share, weight = 0.05, 2.0, 50.0, 0.3, 0.1
    mech = DPMechanism(clip, sigma, 1.0, 1, 1e-5, 8.0, noise_split=4, mechanism="als", max_purchases=cap,
                       count_share=share, count_weight=weight)  # fmt: skip
    out = local_update(state, users, m.train, features, model, LOCAL, 0, torch.zeros(tiny_dataset.n_items), mech)
    names = sum_names(item_tower_shapes(tiny_dataset.n_items, model), ALS_DP)
    assert set(out.item_terms) == {k for k in names if k.startswith("dp_als/")}  # no counts in the message
    clean = noisy_als.clipped_terms(out.user_embeddings.numpy(), m.train, clip, cap)
    s_rhs, _, s_counts = noisy_als.block_scales(clip, cap, share)
    rhs_noise = out.item_terms[noisy_als.RHS].double().numpy() - clean[noisy_als.RHS]
    count_noise = noisy_als.bias_counts(out.item_bias, weight).double().numpy() - clean[noisy_als.COUNTS]
    assert rhs_noise.std() == pytest.approx(sigma / 2 * s_rhs, rel=0.1)  # a share: 1 / sqrt(4)
    assert count_noise.std() == pytest.approx(sigma * s_counts, rel=0.2)  # all of it


@pytest.mark.parametrize("count_share", [0.0, 0.3])
def test_a_private_als_run_spends_its_budget_in_rounds_and_records_the_mechanism(tiny_dataset, count_share):
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    over = {"model.dim": 8, "federation.rounds": 5, "privacy.noise_multiplier": 2.0,
            "privacy.count_share": count_share, "model.merchant_item_bias": count_share > 0}  # fmt: skip
    cfg = load_config(None, {**PRIVATE, **over})
    assert aggregation_rule(cfg, tiny_dataset.n_items) == ALS_DP
    mech = plan_mechanism(cfg.privacy, cfg.federation.rounds, cfg.local.epochs)
    fed = FederationConfig(rounds=5, patience=0, refit=False)
    res = run_federated(tiny_dataset, features, cfg.model, cfg.local, fed, dp=mech)
    assert len(res.history) == 5 and res.best_round == 5  # the last round is released
    assert res.privacy["mechanism"] == "als" and res.privacy["max_purchases"] == 2.0
    assert res.privacy["epsilon"] == pytest.approx(epsilon_spent(mech, 5))
    assert "no subsampling" in res.privacy["accountant"]
    table = res.item_state["item_emb.weight"]
    assert torch.isfinite(table).all() and table.abs().sum() > 0
    if count_share:  # each merchant's bias from its own noised counts, and the card says how
        assert res.privacy["count_share"] == 0.3 and res.privacy["count_weight"] == cfg.privacy.count_weight
        assert all(torch.isfinite(b).all() and b.abs().sum() > 0 for b in res.item_biases.values())
    else:
        assert "count_share" not in res.privacy and all(b is None for b in res.item_biases.values())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"privacy.mechanism": "laplace"}, "privacy.mechanism must be one of dp_sgd, als"),
        ({"privacy.max_purchases": 0}, "privacy.max_purchases must be > 0"),
        ({"privacy.max_purchases": float("nan")}, "privacy.max_purchases must be > 0"),
        ({"local.loss": "softmax", "local.ials_item_step": "sgd"}, "privacy.mechanism = 'als' noises ALS's item step"),
        ({"privacy.mechanism": "dp_sgd"}, "DP-SGD is implemented for local.loss = 'softmax' only"),
        ({"model.merchant_item_bias": True}, "merchant_item_bias = false (DP-ALS: or privacy.count_share > 0)"),
        ({"privacy.count_share": 0.3}, "count_share > 0 needs the bias"),
        ({"privacy.count_share": 1.0, "model.merchant_item_bias": True}, "privacy.count_share must be in [0, 1)"),
        ({"privacy.count_weight": 0}, "privacy.count_weight must be > 0"),
        ({"privacy.accountant": "gdp"}, "privacy.accountant must be one of prv, rdp, got 'gdp'"),
    ],
)
def test_settings_the_private_item_step_cannot_honour_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, {**PRIVATE, **overrides})


@pytest.mark.parametrize("count_share", [0.0, 0.3])
def test_the_best_test_for_one_customer_in_a_merchants_message_is_held_to_the_gaussian_bound(tiny_dataset, count_share):
    """The strongest attack on one customer: the coordinator knows every other customer's part of a
    merchant's sums and asks whether this customer's is in the message (a likelihood-ratio test along
    their contribution). Without noise it always answers right (the part is there, of length about 1,
    or absent, exactly 0); with the noise its AUC over many
    draws stays at the Gaussian mechanism's bound for sensitivity 1, Phi(1 / (sigma sqrt 2)), however
    long the customer's vector and however much they bought; without the clip it would not. With a
    count bias the attacker also reads the merchant's noised counts (through its bias)."""
    from scipy.stats import norm

    from fedrec.privacy.attacks import auc

    m = tiny_dataset.merchants[0]
    heavy = int(np.argmax(np.diff(m.train.indptr)))
    users = np.random.default_rng(0).normal(size=(m.n_users, MODEL.dim)) * 0.05
    users[heavy] *= 100.0  # far beyond the clip
    clip, cap, sigma = 0.05, 2.0, 1.1
    keep = np.arange(m.n_users) != heavy
    with_c = _scaled(noisy_als.clipped_terms(users, m.train, clip, cap), clip, cap, count_share)
    without = _scaled(noisy_als.clipped_terms(users[keep], m.train[keep], clip, cap), clip, cap, count_share)
    contribution = with_c - without
    assert np.linalg.norm(contribution) == pytest.approx(1.0, rel=0.05)  # the bound, nearly used
    direction = contribution / np.linalg.norm(contribution)

    def statistic(terms: dict, seed: int) -> float:
        gen = torch.Generator().manual_seed(seed)
        noised = noisy_als.noised_terms(terms, clip, cap, sigma, gen, count_share)
        if count_share:
            noised[noisy_als.COUNTS] = noisy_als.noised_counts(terms, clip, cap, count_share, sigma, gen)
        seen = _scaled({k: v.double().numpy() for k, v in noised.items()}, clip, cap, count_share)
        return float((seen - without) @ direction)

    present = noisy_als.clipped_terms(users, m.train, clip, cap)
    absent = noisy_als.clipped_terms(users[keep], m.train[keep], clip, cap)
    scores = [statistic(present, s) for s in range(300)] + [statistic(absent, 1000 + s) for s in range(300)]
    labels = np.array([True] * 300 + [False] * 300)
    bound = norm.cdf(1.0 / (sigma * math.sqrt(2.0)))  # 0.74
    assert 0.6 < auc(np.array(scores), labels) < bound + 0.05
