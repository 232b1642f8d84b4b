"""Customer-level differential privacy: the accountant, clipping, noise, the budget stop, and DP off."""

import dataclasses
import json
import math
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant
from scipy.stats import norm
from typer.testing import CliRunner

from fedrec.config import aggregation_rule, load_config
from fedrec.errors import ConfigError
from fedrec.features import build_item_features
from fedrec.federated.local import BIAS, LocalConfig, clipped_customer_sums, local_update, softmax_customer_loss
from fedrec.federated.simulation import FederationConfig, run_federated, with_validation_in_train
from fedrec.model import ModelConfig, init_user_embeddings, new_item_tower
from fedrec.privacy.accountant import (
    ALPHAS,
    DPMechanism,
    epsilon_spent,
    plan_mechanism,
    privacy_entry,
    rounds_within_budget,
    steps_per_epoch,
)
from fedrec.privacy.config import PrivacyConfig
from fedrec.privacy.dp_sgd import (
    add_noise,
    clip_and_sum,
    clipped_gradient_sums,
    padded_baskets,
)
from fedrec.training.cli import app

MODEL = ModelConfig(dim=8, feature_dim=8, hidden=16, hash_buckets=256)
LOCAL = LocalConfig(batch_size=128, temperature=0.5, weight_decay=0.1, lr=0.01, user_lr=0.05)


@pytest.fixture(scope="module")
def features(tiny_dataset):
    return build_item_features(tiny_dataset.items, MODEL.hash_buckets)


# --- the accountant -------------------------------------------------------------------------------


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_planned_noise_meets_the_budget_as_opacus_counts_it_step_by_step(accountant):
    cfg = PrivacyConfig(epsilon=4.0, delta=1e-5, sample_rate=0.05, accountant=accountant)
    mech = plan_mechanism(cfg, rounds=30, epochs=2)
    assert mech.steps_per_round == 2 * 20 and mech.accountant == accountant
    # The library's own answer: an accountant stepped once per local step of every round.
    acc, kwargs = (PRVAccountant(), {}) if accountant == "prv" else (RDPAccountant(), {"alphas": ALPHAS})
    for _ in range(30 * mech.steps_per_round):
        acc.step(noise_multiplier=mech.noise_multiplier, sample_rate=cfg.sample_rate)
    eps = acc.get_epsilon(delta=cfg.delta, **kwargs)
    assert eps == pytest.approx(epsilon_spent(mech, 30), rel=1e-9)
    assert 4.0 * 0.99 <= eps <= 4.0  # the smallest noise that fits, within the search tolerance
    # Less noise would overspend.
    acc.history = [(mech.noise_multiplier * 0.95, cfg.sample_rate, 30 * mech.steps_per_round)]
    assert acc.get_epsilon(delta=cfg.delta, **kwargs) > 4.0


def _gaussian_epsilon(sigma: float | list[float], releases: int, delta: float) -> float:
    """The exact epsilon of `releases` Gaussian mechanisms (sensitivity 1, no subsampling) of noise
    `sigma` (or one per release): their composition is one Gaussian mechanism with mu = sqrt(sum of
    1 / sigma_t^2) (Dong, Roth and Su's Gaussian DP), whose delta(epsilon) is Balle and Wang's closed
    form; solved for epsilon by bisection."""
    sigmas = sigma if isinstance(sigma, list) else [sigma] * releases
    mu = math.sqrt(sum(s**-2 for s in sigmas))

    def delta_at(eps: float) -> float:
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)

    lo, hi = 0.0, 100.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_at(mid) > delta else (lo, mid)
    return hi


@pytest.mark.parametrize("epsilon", [1.0, 8.0, 16.0])
def test_the_prv_accountant_is_tight_where_the_exact_answer_is_known(epsilon):
    """DP-ALS's releases are full-batch Gaussian mechanisms, whose exact epsilon is known: PRV's is a
    certified upper bound within 0.02 of it, while RDP's overstates it by more than 4%, so the same
    budget would need more noise (the reason PRV is the default)."""
    plan = {a: plan_mechanism(PrivacyConfig(epsilon=epsilon, mechanism="als", accountant=a), rounds=3, epochs=1)
            for a in ("prv", "rdp")}  # fmt: skip
    for mech in plan.values():
        exact = _gaussian_epsilon(mech.noise_multiplier, 3, 1e-5)
        spent = epsilon_spent(mech, 3)
        assert exact <= spent <= epsilon  # never below the truth, never past the budget
        if mech.accountant == "prv":
            assert spent - exact <= 0.02
        else:
            assert spent > 1.04 * exact
    assert plan["prv"].noise_multiplier < 0.96 * plan["rdp"].noise_multiplier


@pytest.mark.parametrize("decay", [0.7, 1.2])
def test_a_noise_schedule_spends_the_budget_as_opacus_composes_its_rounds(decay):
    """privacy.noise_decay: round t's noise is round 1's x decay^(t - 1), round 1's the smallest that
    keeps the whole schedule within the budget, accounted round by round as Opacus composes it."""
    cfg = PrivacyConfig(epsilon=8.0, mechanism="als", noise_decay=decay)
    mech = plan_mechanism(cfg, rounds=3, epochs=1)
    sigmas = [mech.noise_at(t) for t in (1, 2, 3)]
    assert sigmas == pytest.approx([mech.noise_multiplier * decay**k for k in range(3)], rel=1e-12)
    acc = PRVAccountant()
    for s in sigmas:
        acc.step(noise_multiplier=s, sample_rate=1.0)
    eps = acc.get_epsilon(delta=cfg.delta)
    assert eps == pytest.approx(epsilon_spent(mech, 3), rel=1e-9) and 8.0 * 0.99 <= eps <= 8.0
    exact = _gaussian_epsilon(sigmas, 3, cfg.delta)  # certified, never below the truth
    assert exact <= eps <= exact + 0.02
    # Gaussian releases compose by their precisions: the schedule's effective noise is the flat one's
    flat = plan_mechanism(dataclasses.replace(cfg, noise_decay=1.0), rounds=3, epochs=1)
    effective = sum(s**-2 for s in sigmas) ** -0.5
    assert effective == pytest.approx(flat.noise_multiplier / math.sqrt(3), rel=0.01)
    # each round runs its own noise; the entry records the first and the last
    assert mech.at_round(3).noise_multiplier == pytest.approx(sigmas[2], rel=1e-12)
    entry = privacy_entry(mech, 3)
    assert (entry["noise_decay"], entry["last_noise_multiplier"]) == (decay, pytest.approx(sigmas[2]))
    # a subsampled schedule: each round's steps at its own noise, as Opacus steps them (a hand-set
    # noise: the search above is the same code, and each subsampled PRV epsilon takes a second)
    sgd = DPMechanism(0.1, 1.5, 0.5, 2, 1e-5, math.inf, noise_decay=decay)
    acc = PRVAccountant()
    for t in (1, 2, 3):
        for _ in range(sgd.steps_per_round):
            acc.step(noise_multiplier=1.5 * decay ** (t - 1), sample_rate=0.5)
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(epsilon_spent(sgd, 3), rel=1e-9)


def test_a_decaying_hand_set_noise_stops_training_when_the_budget_is_spent():
    mech = DPMechanism(1.0, 2.0, 1.0, 1, 1e-5, 8.0, mechanism="als", noise_decay=0.8)
    spent = [epsilon_spent(mech, r) for r in range(1, 12)]
    assert all(a < b for a, b in zip(spent, spent[1:], strict=False))
    r = rounds_within_budget(mech, 100)
    assert epsilon_spent(mech, r) <= 8.0 < epsilon_spent(mech, r + 1)
    flat = dataclasses.replace(mech, noise_decay=1.0)
    assert r < rounds_within_budget(flat, 100)  # less noise each round: fewer rounds fit


def test_a_noise_schedule_too_long_to_account_is_refused_and_a_huge_epsilon_still_answers():
    with pytest.raises(ConfigError, match="noise schedule .* at most 20 federation.rounds"):
        plan_mechanism(PrivacyConfig(epsilon=8.0, noise_split=6, noise_decay=0.99), rounds=200, epochs=1)
    # PRV answers inf (or asks for terabytes) at this epsilon: RDP's certified bound answers instead
    tiny = DPMechanism(1.0, 0.05, 1.0, 1, 1e-5, 8.0, mechanism="als")
    rdp = epsilon_spent(dataclasses.replace(tiny, accountant="rdp"), 3)
    assert epsilon_spent(tiny, 3) == rdp and 500 < rdp < math.inf


def test_epsilon_grows_with_rounds_and_the_budget_cuts_the_schedule():
    mech = DPMechanism(
        clip=1.0, noise_multiplier=2.0, sample_rate=0.1, steps_per_round=10, delta=1e-5, target_epsilon=3.0
    )
    spent = [epsilon_spent(mech, r) for r in range(0, 40, 5)]
    assert spent[0] == 0.0 and all(a < b for a, b in zip(spent, spent[1:], strict=False))
    r = rounds_within_budget(mech, 1000)
    assert 1 <= r < 1000
    assert epsilon_spent(mech, r) <= 3.0 < epsilon_spent(mech, r + 1)


def test_a_hand_set_noise_that_overspends_in_round_one_is_refused():
    with pytest.raises(ConfigError, match="first round alone"):
        plan_mechanism(PrivacyConfig(epsilon=0.5, noise_multiplier=0.3, sample_rate=0.5), rounds=10, epochs=1)


def test_privacy_is_off_by_default():
    assert plan_mechanism(PrivacyConfig(), rounds=60, epochs=1) is None
    assert steps_per_epoch(0.1) == 10 and steps_per_epoch(0.3) == 4 and steps_per_epoch(1.0) == 1


# --- clipping and noise ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    customers=st.integers(1, 12),
    clip=st.floats(0.01, 10.0),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_clipping_bounds_every_customers_contribution(customers, clip, scale, seed):
    g = torch.Generator().manual_seed(seed)
    per = {
        "a": torch.randn(customers, 5, 3, generator=g, dtype=torch.float64) * scale,
        "b": torch.randn(customers, 7, generator=g, dtype=torch.float64) * scale,
    }
    total, norms = clip_and_sum(per, clip)
    for c in range(customers):
        # The sum without customer c differs from the full sum by at most `clip` (the sensitivity).
        rest, _ = clip_and_sum({k: torch.cat([v[:c], v[c + 1 :]]) for k, v in per.items()}, clip)
        diff = math.sqrt(sum(float((total[k] - rest[k]).pow(2).sum()) for k in per))
        assert diff <= clip * (1 + 1e-9)
        full = math.sqrt(sum(float(v[c].pow(2).sum()) for v in per.values()))
        assert norms[c].item() == pytest.approx(full, rel=1e-9)
        if full <= clip:  # small gradients pass unchanged
            assert diff == pytest.approx(full, rel=1e-6)


def test_noise_has_the_configured_standard_deviation():
    mech = DPMechanism(clip=0.7, noise_multiplier=1.3, sample_rate=0.1, steps_per_round=1, delta=1e-5, target_epsilon=8)
    noisy = add_noise({"w": torch.zeros(400_000)}, mech, torch.Generator().manual_seed(0))["w"]
    assert noisy.mean().abs() < 0.01
    assert noisy.std().item() == pytest.approx(0.7 * 1.3, rel=0.01)


def test_one_customer_moves_the_private_gradient_by_at_most_clip_over_the_batch(tiny_dataset, features):
    """End to end through the real per-customer loss: no noise, drop one customer, compare."""
    m = tiny_dataset.merchants[0]
    tower = new_item_tower(tiny_dataset.n_items, MODEL, 0)
    shared = {k: p.detach() for k, p in tower.named_parameters()}
    users = init_user_embeddings(m.n_users, MODEL, torch.Generator().manual_seed(0)) * 20
    indptr = torch.from_numpy(m.train.indptr.astype(np.int64))
    indices = torch.from_numpy(m.train.indices.astype(np.int64))
    rows = torch.arange(min(m.n_users, 40))
    pos, mask = padded_baskets(indptr, indices, rows)
    for r in range(3):  # the padded rows are exactly each customer's purchases
        assert sorted(pos[r][mask[r]].tolist()) == sorted(m.train[r].indices.tolist())

    from fedrec.federated.local import item_vectors_functional

    def loss(sh, u, p, k):
        logp = torch.log_softmax(item_vectors_functional(sh, features, MODEL) @ u / 0.5, dim=0)
        return -(logp[p] * k.float()).sum() / k.sum().clamp(min=1)

    clip = 0.05
    full, user_grads, norms = clipped_gradient_sums(shared, loss, users[rows], pos, mask, clip)
    assert user_grads.shape == (len(rows), MODEL.dim)
    assert (norms > clip).sum() > len(rows) // 2  # the bound binds for most customers here
    keep = torch.arange(len(rows)) != 3
    part, _, _ = clipped_gradient_sums(shared, loss, users[rows][keep], pos[keep], mask[keep], clip)
    diff = math.sqrt(sum(float((full[k] - part[k]).pow(2).sum()) for k in full))
    assert 0 < diff <= clip * (1 + 1e-5)


@pytest.mark.parametrize(
    ("model", "with_bias"),
    [
        (dataclasses.replace(MODEL, use_content=False), True),  # plain id table: the closed form
        (dataclasses.replace(MODEL, use_content=False), False),
        (MODEL, True),  # content tower: differentiated over the used token rows only
        (dataclasses.replace(MODEL, use_item_id=False), False),
        (dataclasses.replace(MODEL, id_rows=16), True),  # compositional ids: plain vmap
    ],
    ids=["table+bias", "table", "content+id+bias", "content", "compositional+bias"],
)
def test_fast_private_sums_equal_vmap_over_the_whole_tower(tiny_dataset, model, with_bias):
    """The shortcuts DP training takes give each customer's norm, the clipped sums and the user
    gradients that vmap over the whole tower and the real loss gives (in float64, so that a wrong
    term cannot hide in float32 rounding)."""
    m, n = tiny_dataset.merchants[0], tiny_dataset.n_items
    features = build_item_features(tiny_dataset.items, model.hash_buckets)
    g = torch.Generator().manual_seed(0)
    shared = {k: p.detach().double() for k, p in new_item_tower(n, model, 0).named_parameters()}
    if with_bias:
        shared[BIAS] = 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    users = init_user_embeddings(m.n_users, model, g).double() * 20
    rows = torch.arange(min(m.n_users, 40))
    indptr = torch.from_numpy(m.train.indptr.astype(np.int64))
    pos, mask = padded_baskets(indptr, torch.from_numpy(m.train.indices.astype(np.int64)), rows)
    mask[5] = False  # a sampled customer without purchases adds only their weight decay
    loss = softmax_customer_loss(features, model, LOCAL.temperature, LOCAL.weight_decay)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        clip = float(clipped_gradient_sums(shared, loss, users[rows], pos, mask, 1.0)[2].median())
        want, want_users, want_norms = clipped_gradient_sums(shared, loss, users[rows], pos, mask, clip)
        got, got_users, got_norms = clipped_customer_sums(
            shared, features, model, LOCAL.temperature, LOCAL.weight_decay, users[rows], pos, mask, clip
        )
    finally:
        torch.set_default_dtype(default)
    assert 0 < int((want_norms > clip).sum()) < len(rows)  # some customers are clipped, some are not
    assert list(got) == list(want)  # same tensors, same order (so the same noise draws follow)
    torch.testing.assert_close(got_norms, want_norms, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_users, want_users, rtol=1e-9, atol=1e-12)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-9, atol=1e-12 * (1 + float(want[k].abs().max())))


# --- the local update and the loop ----------------------------------------------------------------


def test_dp_local_update_sends_only_public_weights_and_depends_on_the_noise(tiny_dataset, features):
    m = tiny_dataset.merchants[0]
    state = {k: v.detach().clone() for k, v in new_item_tower(tiny_dataset.n_items, MODEL, 0).state_dict().items()}
    users = init_user_embeddings(m.n_users, MODEL, torch.Generator().manual_seed(0))
    mech = DPMechanism(clip=1.0, noise_multiplier=1.0, sample_rate=0.2, steps_per_round=5, delta=1e-5, target_epsilon=8)
    a = local_update(state, users, m.train, features, MODEL, LOCAL, seed=1, dp=mech)
    b = local_update(state, users, m.train, features, MODEL, LOCAL, seed=2, dp=mech)
    again = local_update(state, users, m.train, features, MODEL, LOCAL, seed=1, dp=mech)
    assert (a.num_examples, a.num_steps, a.mean_loss) == (1, 5, 0.0)
    assert not a.touched_rows.any()
    assert all(torch.equal(a.delta[k], again.delta[k]) for k in a.delta)  # seeded
    assert not torch.allclose(a.delta["item_emb.weight"], b.delta["item_emb.weight"])
    # Every id row moves (noise everywhere), not only the rows of purchased items.
    bought = np.asarray(m.train.sum(axis=0)).ravel() > 0
    moved = a.delta["item_emb.weight"].abs().sum(1) > 0
    assert moved[torch.from_numpy(~bought)].all()


def test_dp_off_gives_the_non_private_run_exactly(tiny_dataset, features):
    cfg = FederationConfig(rounds=3, patience=0)
    plain = run_federated(tiny_dataset, features, MODEL, LOCAL, cfg)
    planned = plan_mechanism(PrivacyConfig(), cfg.rounds, LOCAL.epochs)
    off = run_federated(tiny_dataset, features, MODEL, LOCAL, cfg, dp=planned)
    assert off.privacy is None and plain.privacy is None
    assert all(torch.equal(plain.item_state[k], off.item_state[k]) for k in plain.item_state)
    assert [h.val_recall_at_20 for h in plain.history] == [h.val_recall_at_20 for h in off.history]


def test_training_stops_when_the_budget_is_spent_and_releases_the_last_round(tiny_dataset, features):
    mech = DPMechanism(
        clip=1.0, noise_multiplier=2.0, sample_rate=0.5, steps_per_round=2, delta=1e-5, target_epsilon=6.0
    )
    fits = rounds_within_budget(mech, 50)
    assert 1 < fits < 50
    cfg = FederationConfig(rounds=50, patience=2, refit=True)
    res = run_federated(tiny_dataset, features, MODEL, LOCAL, cfg, dp=mech)
    assert len(res.history) == fits  # neither early stopping nor more rounds than the budget allows
    # and no second pass over the same customers (outside the accounted budget): the one run
    # trained on train + validation, the refit's data, from its first round
    assert res.refit_rounds == fits and res.early_stopped is None
    assert all(h.val_recall_at_20 is None for h in res.history)
    assert res.best_round == fits
    assert res.privacy["epsilon"] <= 6.0 and res.privacy["rounds"] == fits
    assert res.privacy["noise_multiplier"] == 2.0


def test_a_dp_run_with_the_refit_on_trains_once_on_train_and_validation(tiny_dataset, features):
    mech = DPMechanism(
        clip=1.0, noise_multiplier=2.0, sample_rate=0.5, steps_per_round=2, delta=1e-5, target_epsilon=50.0
    )
    on = run_federated(tiny_dataset, features, MODEL, LOCAL, FederationConfig(rounds=3, patience=0), dp=mech)
    off = FederationConfig(rounds=3, patience=0, refit=False)
    whole = run_federated(with_validation_in_train(tiny_dataset), features, MODEL, LOCAL, off, dp=mech)
    train_only = run_federated(tiny_dataset, features, MODEL, LOCAL, off, dp=mech)
    assert all(torch.equal(on.item_state[k], whole.item_state[k]) for k in on.item_state)
    assert not torch.equal(on.item_state["item_emb.weight"], train_only.item_state["item_emb.weight"])
    assert on.privacy == whole.privacy == train_only.privacy  # the same customers, the same epsilon
    assert [h.val_recall_at_20 is not None for h in train_only.history] == [True] * 3  # refit off: validated


# --- configuration --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("privacy.epsilon", 0, "privacy.epsilon must be > 0"),
        ("privacy.epsilon", -1.0, "privacy.epsilon must be > 0"),
        ("privacy.delta", 0, "privacy.delta must be in (0, 1)"),
        ("privacy.delta", 1.0, "privacy.delta must be in (0, 1)"),
        ("privacy.noise_multiplier", -0.1, "privacy.noise_multiplier must be >= 0"),
        ("privacy.clip", 0, "privacy.clip must be > 0"),
        ("privacy.sample_rate", 0, "privacy.sample_rate must be in (0, 1]"),
        ("privacy.sample_rate", 1.5, "privacy.sample_rate must be in (0, 1]"),
        ("privacy.noise_decay", 0, "privacy.noise_decay must be in (0, 2]"),
        ("privacy.noise_decay", 2.5, "privacy.noise_decay must be in (0, 2]"),
    ],
)
def test_out_of_range_privacy_settings_are_refused_by_name(setting, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        load_config(None, {setting: value})


def test_privacy_needs_the_softmax_loss_and_fedavg():
    with pytest.raises(ConfigError, match="local.loss"):
        load_config(None, {"privacy.epsilon": 8.0, "local.loss": "bpr"})
    with pytest.raises(ConfigError, match="rowwise"):
        load_config(None, {"privacy.epsilon": 8.0, "federation.aggregation": "rowwise"})
    # the default (auto) resolves to fedavg under DP: no per-row weights leave a merchant
    cfg = load_config(None, {"privacy.epsilon": 8.0})
    assert cfg.federation.aggregation == "auto" and aggregation_rule(cfg, 100) == "fedavg"
    assert aggregation_rule(load_config(None, {}), 100) == "rowwise"


def test_infinite_epsilon_round_trips_as_plain_json():
    cfg = load_config(None, {"privacy.epsilon": "inf"})
    assert not cfg.privacy.enabled
    text = json.dumps(cfg.to_dict(), allow_nan=False)  # what the API's JSON encoder requires
    assert '"epsilon": "inf"' in text
    again = load_config(None, {"privacy.epsilon": json.loads(text)["privacy"]["epsilon"]})
    assert again.privacy == cfg.privacy


def test_cli_refuses_a_bad_privacy_setting_with_one_error_line(tmp_path):
    result = CliRunner().invoke(app, ["train", "--set", "privacy.delta=2", "--set", f"output.artifacts_dir={tmp_path}"])
    assert result.exit_code == 2
    assert "privacy.delta must be in (0, 1)" in result.output and "Traceback" not in result.output
    assert not any(tmp_path.iterdir())


def test_dp_training_writes_the_spent_epsilon_into_the_model_card(tmp_path, tiny_csv):
    args = [
        "train", "--dataset", "file", "--set", f"data.path={tiny_csv}",
        # the file default chooses it on validation, which DP refuses: fixed, as before that default
        "--set", "local.temperature=0.5",
        "--set", f"output.artifacts_dir={tmp_path / 'artifacts'}", "--set", "federation.rounds=2",
        "--set", "model.dim=8", "--set", "model.hash_buckets=256",
        "--set", "privacy.epsilon=8", "--set", "privacy.sample_rate=0.5",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    card_path = next((tmp_path / "artifacts").glob("*/exports/v*/model_card.json"))
    dp = json.loads(card_path.read_text())["privacy"]["differential_privacy"]
    assert dp["rounds"] == 2 and 0 < dp["epsilon"] <= 8.0 and dp["delta"] == 1e-5
    assert dp["noise_multiplier"] > 0 and dp["sample_rate"] == 0.5
    assert dataclasses.asdict(PrivacyConfig())["delta"] == dp["delta"]


def test_privacy_report_writes_rows_table_and_curve(tmp_path, tiny_csv):
    args = [
        "privacy-report", "--dataset", "file", "--set", f"data.path={tiny_csv}",
        # the file default chooses it on validation, which DP refuses: fixed, as before that default
        "--set", "local.temperature=0.5",
        "--set", f"output.artifacts_dir={tmp_path / 'artifacts'}",
        "--set", f"output.results_dir={tmp_path / 'results'}", "--set", "federation.rounds=2",
        "--set", "model.dim=8", "--set", "model.hash_buckets=256",
        "--set", "privacy.sample_rate=0.5", "--epsilons", "4,inf", "--seeds", "2", "--dp-rounds", "2",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "results" / "privacy-report.json").read_text())
    runs = report["runs"]
    by_eps = {r["epsilon"]: r for r in runs}
    assert set(by_eps) == {4.0, "inf"}
    dp, plain = by_eps[4.0], by_eps["inf"]
    assert dp["seeds"] == [0, 1] and len(dp["per_seed"]) == 2
    assert dp["recall@20"] == pytest.approx(np.mean(dp["per_seed"]))
    assert dp["recall@20_std"] == pytest.approx(np.std(dp["per_seed"], ddof=1))  # as in evaluate
    assert dp["noise_multiplier"] > 0 and dp["rounds"] == 2 and all(0 < e <= 4.0 for e in dp["epsilon_spent"])
    assert plain["noise_multiplier"] == 0.0 and plain["epsilon_spent"] == ["inf", "inf"]
    assert (dp["accountant"], plain["accountant"]) == ("prv", None)  # the default accountant, named
    assert dp["command"] == plain["command"] == report["command"]  # each row names the run that made it
    table = (tmp_path / "results" / "privacy-report.md").read_text()
    assert "| file | per merchant, dp_sgd | 4.0 |" in table and "| file | none | inf |" in table
    assert (tmp_path / "results" / "privacy-report.png").read_bytes()[:4] == b"\x89PNG"
    # Split noise: its own rows beside the per-merchant ones; the --dp-set settings reach DP runs only.
    split = [
        *args[: args.index("--epsilons")], "--epsilons", "4", "--seeds", "1", "--dp-rounds", "3",
        "--dp-set", "privacy.noise_split=3", "--dp-set", "federation.server.name=fedadam",
        "--dp-set", "federation.server.lr=0.01",
    ]  # fmt: skip
    result = CliRunner().invoke(app, split)
    assert result.exit_code == 0, result.output
    runs = json.loads((tmp_path / "results" / "privacy-report.json").read_text())["runs"]
    assert sorted((str(r["epsilon"]), r["noise_split"]) for r in runs) == [("4.0", 0), ("4.0", 3), ("inf", 0)]
    kept = next(r for r in runs if r["epsilon"] == 4.0 and r["noise_split"] == 0)
    assert kept["recall@20_std"] == pytest.approx(dp["recall@20_std"])  # the earlier row, merged unchanged
    row = next(r for r in runs if r["noise_split"] == 3)
    assert row["rounds"] == 3 and row["epsilon_if_other_merchants_collude"] > row["epsilon_spent"][0]
    assert "| file | split over 3, dp_sgd | 4.0 |" in (tmp_path / "results" / "privacy-report.md").read_text()
    # DP-ALS: rows of their own beside DP-SGD's of the same epsilon and noise split
    als = [
        *args[: args.index("--epsilons")], "--epsilons", "4", "--seeds", "1", "--dp-rounds", "2",
        "--dp-set", "privacy.mechanism=als", "--dp-set", "local.loss=ials", "--dp-set", "local.ials_item_step=exact",
        "--dp-set", "local.temperature=1", "--dp-set", "model.use_content=false", "--dp-set", "privacy.clip=0.05",
    ]  # fmt: skip
    result = CliRunner().invoke(app, als)
    assert result.exit_code == 0, result.output
    runs = json.loads((tmp_path / "results" / "privacy-report.json").read_text())["runs"]
    assert len(runs) == 4
    row = next(r for r in runs if r.get("mechanism") == "als")
    assert (row["noise_split"], row["sample_rate"], row["max_purchases"], row["rounds"]) == (0, 1.0, 2.0, 2)
    assert next(r for r in runs if r["epsilon"] == 4.0 and r["noise_split"] == 0 and r["mechanism"] == "dp_sgd")
    assert "| file | per merchant, als | 4.0 |" in (tmp_path / "results" / "privacy-report.md").read_text()
    bad = CliRunner().invoke(app, [*split[:-2], "--dp-set", "lr=0.01"])
    assert bad.exit_code == 2 and "--dp-set 'lr'" in bad.output and "Traceback" not in bad.output
    unknown = CliRunner().invoke(app, [*split[:-2], "--dp-set", "federation.nope.lr=0.01"])
    assert unknown.exit_code == 2 and "nope" in unknown.output and "Traceback" not in unknown.output


def test_leakage_metrics_score_a_perfect_and_a_blind_attacker():
    from fedrec.privacy.attacks import auc, leakage_metrics, row_scores

    sold = np.zeros(100, dtype=bool)
    sold[:10] = True
    table = np.zeros((100, 4))
    table[:10] = 5.0  # the sold rows moved
    perfect = leakage_metrics(row_scores(table), sold)
    assert perfect == {"precision": 1.0, "recall": 1.0, "auc": 1.0, "sold": 10, "items": 100}
    blind = leakage_metrics(np.random.default_rng(0).normal(size=100), sold)
    assert 0.5 <= blind["auc"] < 0.7 and blind["precision"] < 0.5
    inverted = leakage_metrics(-row_scores(table), sold)  # the attacker orients the signal itself
    assert inverted["auc"] == 1.0 and inverted["precision"] == 1.0
    assert auc(np.arange(4.0), np.array([False, False, True, True])) == 1.0


def test_attack_report_leaks_without_protection_and_not_with_dp(tmp_path, tiny_csv, monkeypatch):
    """The attack finds the sold items in one merchant's plain update and not in its DP update."""
    args = [
        "attack-report", "--dataset", "file", "--set", f"data.path={tiny_csv}",
        # the file default chooses it on validation, which DP refuses: fixed, as before that default
        "--set", "local.temperature=0.5",
        "--set", f"output.results_dir={tmp_path}", "--set", "model.dim=8", "--set", "model.hash_buckets=256",
        "--set", "privacy.sample_rate=0.5", "--set", "federation.rounds=3", "--epsilon", "1", "--dp-rounds", "3",
        "--poison-rounds", "2", "--seeds", "1", "--colluders", "2",
        # split-noise rows: the noise shared by the 3 merchants, 3 rounds of one DP step each
        "--split-set", "privacy.noise_split=3", "--split-set", "federation.server.name=fedadam",
        "--split-set", "federation.rounds=3",
    ]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--sum-clips", "2"])
    assert result.exit_code == 0, result.output
    leak = json.loads((tmp_path / "attack-report.json").read_text())["leakage"]
    assert set(leak) == {"none", "secagg_sum", "dp", "dp_secagg", "dp_split", "dp_split_secagg"}
    # the sum of split-noise messages carries the whole noise: the coordinator learns nothing
    assert leak["dp_split_secagg"]["auc"] < 0.6
    assert leak["dp_split"]["noise_split"] == 3 and leak["dp_split"]["rounds"] == 3
    assert leak["dp_split"]["noise_multiplier"] < leak["dp"]["noise_multiplier"]  # 3 steps, not 3 x 1/q
    # On the tiny shop (190 items, 55 to 80% of them sold by each shop) the signal is weaker than
    # on the synthetic shop (README), but clear without protection and gone with DP.
    assert leak["none"]["auc"] > 0.7
    assert leak["dp"]["auc"] < 0.6 and leak["dp_secagg"]["auc"] < 0.6
    assert leak["dp"]["precision"] < leak["none"]["precision"]
    member = json.loads((tmp_path / "attack-report.json").read_text())["membership"]
    assert set(member) == {"none", "dp", "dp_split"} and member["dp"]["epsilon"] == 1.0
    assert member["dp_split"]["noise_split"] == 3 and member["dp_split"]["rounds"] == 3
    assert all(0.0 <= r["auc"] <= 1.0 and r["members"] > 0 and r["non_members"] > 0 for r in member.values())
    poison = json.loads((tmp_path / "attack-report.json").read_text())["poisoning"]
    # no robust rule: labelled by the rule it ran, the default auto = rowwise on this shop
    assert set(poison["rules"]) == {"rowwise", "norm_clip", "row_clip", "row_clip_foolsgold", "trimmed_mean", "median",
                                    "rowwise_sum_clip_x2"}  # fmt: skip
    assert [r["secure_aggregation_compatible"] for r in poison["rules"].values()] == [True, *[False] * 5, True]
    assert poison["rules"]["rowwise_sum_clip_x2"]["sum_clip"] == 2.0  # the sum form with its bound
    for r in poison["rules"].values():  # who wins is tested in tests/test_poisoning.py; here: the report's shape
        assert 0 <= r["target_exposure"] <= 1 and 0 <= r["clean_exposure"] <= 1 and 0 < r["recall@20"] < 1
    report = json.loads((tmp_path / "attack-report.json").read_text())
    assert poison["attackers"] == 1 and report["poisoning_colluding"]["attackers"] == 2
    assert set(report["poisoning_colluding"]["rules"]) == set(poison["rules"])
    # One part rerun replaces that section only; the file names the run behind each section.
    again = [a if a != "1" else "2" for a in args] + ["--parts", "membership"]  # --epsilon 2
    result = CliRunner().invoke(app, again)
    assert result.exit_code == 0, result.output
    partial = json.loads((tmp_path / "attack-report.json").read_text())
    assert partial["membership"]["dp"]["epsilon"] == 2.0 and partial["leakage"] == report["leakage"]
    assert partial["poisoning"] == report["poisoning"]
    assert set(partial["commands"]) == {"leakage", "membership", "poisoning", "poisoning_colluding"}
    bad = CliRunner().invoke(app, [*args, "--parts", "leakage,spying"])
    assert bad.exit_code != 0 and "choose from leakage, membership, poisoning" in bad.output
    # Some rules rerun: their rows are added or replaced, the other rules' rows stay.
    loose = [*args, "--parts", "poisoning", "--rules", "norm_clip", "--clip-multiples", "1,1000", "--colluders", "1"]
    with monkeypatch.context() as m:  # the command the file records for this run
        m.setattr(sys, "argv", ["fedrec", "attack-report", "--rules", "norm_clip"])
        result = CliRunner().invoke(app, loose)
    assert result.exit_code == 0, result.output
    after = json.loads((tmp_path / "attack-report.json").read_text())
    rows = after["poisoning"]["rules"]
    assert list(rows) == [
        "rowwise", "norm_clip", "row_clip", "row_clip_foolsgold", "trimmed_mean", "median", "rowwise_sum_clip_x2",
        "norm_clip_x1000",
    ]  # fmt: skip
    assert after["command"] == "fedrec attack-report --rules norm_clip"
    assert rows["rowwise"] == poison["rules"]["rowwise"]  # kept as it was, naming the first run
    assert rows["rowwise"]["command"] == report["commands"]["poisoning"] != after["command"]
    assert rows["norm_clip"]["clip_multiple"] == 1.0 and rows["norm_clip_x1000"]["clip_multiple"] == 1000.0
    assert rows["norm_clip_x1000"]["command"] == after["command"]  # each row names the run that made it
    assert after["poisoning_colluding"] == report["poisoning_colluding"]  # --colluders 1: not rerun
    assert all(0 < r["clean_val_recall@20"] < 1 for r in (rows["norm_clip"], rows["norm_clip_x1000"]))

    def one_rule_at(rule: str, setting: str) -> dict:
        """The poisoning rows after a rerun of `rule` with `--set setting`."""
        result = CliRunner().invoke(app, [*args, "--parts", "poisoning", "--rules", rule, "--colluders", "1",
                                          "--set", setting])  # fmt: skip
        assert result.exit_code == 0, result.output
        return json.loads((tmp_path / "attack-report.json").read_text())["poisoning"]["rules"]

    # without --clip-multiples, norm_clip runs at the configured bound
    rows = one_rule_at("norm_clip", "federation.clip_multiple=3")
    assert list(rows)[-1] == "norm_clip_x3" and rows["norm_clip_x3"]["clip_multiple"] == 3.0
    # a trimmed mean at another trim gets its own row; the default trim's row stays
    rows = one_rule_at("trimmed_mean", "federation.trim=0.4")
    assert list(rows)[-1] == "trimmed_mean_t0.4" and rows["trimmed_mean_t0.4"]["trim"] == 0.4
    assert rows["trimmed_mean"] == poison["rules"]["trimmed_mean"]  # kept as it was
    for flag, value in (("--clip-multiples", "0.5"), ("--clip-multiples", "x"), ("--rules", "krum")):
        bad = CliRunner().invoke(app, [*loose, flag, value])
        assert bad.exit_code != 0 and flag in bad.output and "Traceback" not in bad.output, bad.output
    # a bad poisoning flag is refused before the first report (leakage) runs, not after it
    import fedrec.training.attack_report as attack_report

    monkeypatch.setattr(attack_report, "leakage_report", lambda *a, **k: pytest.fail("leakage ran before the check"))
    bad = CliRunner().invoke(app, [*args, "--rules", "krum"])
    assert bad.exit_code != 0 and "--rules 'krum': choose from none, norm_clip" in bad.output, bad.output


def test_a_rerun_of_some_poisoning_rules_keeps_the_others_rows_only_for_the_same_attack(tmp_path):
    from fedrec.training.attack_report import write_attack_report

    attack = {"attackers": 1, "fake_customers": 5, "boost": 100.0, "strength": 20.0, "filler": 4, "rounds": 2,
              "seeds": [0]}  # fmt: skip
    # a file written before rows named their run: its section's command stands for them
    before = {"rowwise": {"target_exposure": 0.5}, "norm_clip": {"target_exposure": 0.0}}
    old = {"dataset": "d", "commands": {"poisoning": "old run"}, "poisoning": {**attack, "rules": before}}
    (tmp_path / "attack-report.json").write_text(json.dumps(old))
    new = {"dataset": "d", "poisoning": {**attack, "rules": {"norm_clip": {"target_exposure": 0.1}}}}
    rows = json.loads(write_attack_report(new, tmp_path, "new run").read_text())["poisoning"]["rules"]
    assert rows == {
        "rowwise": {"command": "old run", "target_exposure": 0.5},
        "norm_clip": {"command": "new run", "target_exposure": 0.1},
    }
    other = {"dataset": "d", "poisoning": {**attack, "rounds": 3, "rules": {"median": {"target_exposure": 0.0}}}}
    rows = json.loads(write_attack_report(other, tmp_path, "third run").read_text())["poisoning"]["rules"]
    assert rows == {"median": {"command": "third run", "target_exposure": 0.0}}  # another attack: nothing kept


def test_attack_report_refuses_split_rows_without_a_split(tmp_path):
    """--split-set without privacy.noise_split >= 2 would label plain DP rows as split: refused."""
    for sets in (["federation.server.name=fedadam"], ["privacy.noise_split=1"], ["privacy.noise_split=x"]):
        args = ["attack-report", "--set", f"output.results_dir={tmp_path}"]
        for item in sets:
            args += ["--split-set", item]
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0 and "privacy.noise_split=N with N >= 2" in result.output, result.output
    clash = CliRunner().invoke(
        app, ["attack-report", "--set", f"output.results_dir={tmp_path}", "--split-set", "privacy.noise_split=3",
              "--split-set", "privacy.epsilon=2"],
    )  # fmt: skip
    assert clash.exit_code != 0 and "use --epsilon" in clash.output and "Traceback" not in clash.output
    assert not (tmp_path / "attack-report.json").exists()


def test_evaluate_refuses_a_private_config_instead_of_ignoring_it(tmp_path):
    result = CliRunner().invoke(
        app, ["evaluate", "--set", "privacy.epsilon=8", "--set", f"output.results_dir={tmp_path}"]
    )
    assert result.exit_code == 2 and "fedrec privacy-report" in result.output
    assert "Traceback" not in result.output
