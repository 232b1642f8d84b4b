"""Poisoning and robust aggregation: the rules by hand on toy tensors, and the item-promotion
attack end to end: it succeeds under FedAvg (the only rule secure aggregation allows) and fails
under the robust rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedrec.config import load_config
from fedrec.data import FederatedDataset, pooled
from fedrec.errors import ConfigError
from fedrec.features import ItemFeatures, build_item_features
from fedrec.federated.aggregation import delta_from_sums, merchant_sums
from fedrec.federated.local import LocalConfig
from fedrec.federated.robust import foolsgold_weights, robust_delta
from fedrec.federated.simulation import FederationConfig, run_federated
from fedrec.federated.sum_clip import clip_rows_of_sum
from fedrec.model import ItemTower, ModelConfig, item_embeddings
from fedrec.privacy.poisoning import colluding, exposure, fake_merchant, promote, pushed_token_rows
from fedrec.training.attack_report import pick_target


def message(delta: list[float], n: int, steps: int = 1) -> dict[str, torch.Tensor]:
    d = {"item_emb.weight": torch.tensor([delta])}
    return merchant_sums(d, n, steps, torch.ones(1, dtype=torch.bool), 0.0, "fedavg", False)


def test_median_and_trimmed_mean_by_hand():
    msgs = [message([1.0, 10.0], 1), message([2.0, -4.0], 5), message([3.0, 0.0], 2), message([100.0, 1.0], 9)]
    med = robust_delta(msgs, "median")["item_emb.weight"]
    assert torch.allclose(med, torch.tensor([[2.5, 0.5]]))  # even count: mean of the middle two
    odd = robust_delta(msgs[:3], "median")["item_emb.weight"]
    assert torch.allclose(odd, torch.tensor([[2.0, 0.0]]))
    trimmed = robust_delta(msgs, "trimmed_mean", trim=0.25)["item_emb.weight"]  # drops one at each end
    assert torch.allclose(trimmed, torch.tensor([[2.5, 0.5]]))
    none_dropped = robust_delta(msgs, "trimmed_mean", trim=0.2)["item_emb.weight"]  # int(0.8) = 0
    assert torch.allclose(none_dropped, torch.tensor([[26.5, 1.75]]))


def test_norm_clip_bounds_each_delta_and_each_weight_by_the_rounds_median():
    msgs = [message([3.0, 4.0], 1), message([0.0, 1.0], 2), message([30.0, 40.0], 1000)]
    # norms 5, 1, 50 -> median 5: the last is scaled by 0.1; weights 1, 2, 1000 -> capped at 2
    got = robust_delta(msgs, "norm_clip")["item_emb.weight"]
    want = (1 * torch.tensor([3.0, 4.0]) + 2 * torch.tensor([0.0, 1.0]) + 2 * torch.tensor([3.0, 4.0])) / 5
    assert torch.allclose(got, want[None])


def test_norm_clip_multiple_scales_both_bounds_and_at_a_large_one_is_the_weighted_mean():
    msgs = [message([3.0, 4.0], 1), message([0.0, 1.0], 2), message([30.0, 40.0], 1000)]
    # multiple 4: norms bounded at 4 x 5 = 20 (the last scaled by 0.4), weights capped at 4 x 2 = 8
    got = robust_delta(msgs, "norm_clip", clip_multiple=4.0)["item_emb.weight"]
    want = (1 * torch.tensor([3.0, 4.0]) + 2 * torch.tensor([0.0, 1.0]) + 8 * torch.tensor([12.0, 16.0])) / 11
    assert torch.allclose(got, want[None])
    # bounds above every norm and weight: nothing is clipped, so it is fedavg's weighted mean
    loose = robust_delta(msgs, "norm_clip", clip_multiple=1000.0)["item_emb.weight"]
    fedavg = (1 * torch.tensor([3.0, 4.0]) + 2 * torch.tensor([0.0, 1.0]) + 1000 * torch.tensor([30.0, 40.0])) / 1003
    assert torch.allclose(loose, fedavg[None])
    with pytest.raises(ValueError, match="clip_multiple"):
        robust_delta(msgs, "norm_clip", clip_multiple=0.5)


def rows_message(rows: list[list[float]], n: int) -> dict[str, torch.Tensor]:
    d = {"item_emb.weight": torch.tensor(rows), "mlp.0.bias": torch.tensor([float(len(rows))] * 2)}
    return merchant_sums(d, n, 1, torch.ones(len(rows), dtype=torch.bool), 0.0, "fedavg", False)


def test_row_clip_bounds_each_row_by_that_rows_median_over_merchants():
    msgs = [
        rows_message([[3.0, 4.0], [0.0, 1.0]], 1),
        rows_message([[0.0, 2.0], [0.0, 3.0]], 2),
        rows_message([[30.0, 40.0], [0.0, 0.5]], 1000),
    ]
    # row 0: norms 5, 2, 50 -> median 5 (the last scaled by 0.1); row 1: norms 1, 3, 0.5 -> median 1
    # (the second scaled by 1/3); weights 1, 2, 1000 -> capped at 2; a 1-D tensor is one row
    got = robust_delta(msgs, "row_clip")
    row0 = [(1 * 3.0 + 2 * 0.0 + 2 * 3.0) / 5, (1 * 4.0 + 2 * 2.0 + 2 * 4.0) / 5]
    want = torch.tensor([row0, [0.0, (1 * 1.0 + 2 * 1.0 + 2 * 0.5) / 5]])
    torch.testing.assert_close(got["item_emb.weight"], want)
    torch.testing.assert_close(got["mlp.0.bias"], torch.tensor([2.0, 2.0]))  # equal rows: nothing clipped
    # multiple 4: rows bounded at 4 x their medians, weights at 4 x 2 = 8
    loose = robust_delta(msgs, "row_clip", clip_multiple=4.0)["item_emb.weight"]
    row0 = [(3.0 + 0.0 + 8 * 12.0) / 11, (4.0 + 2 * 2.0 + 8 * 16.0) / 11]
    want4 = torch.tensor([row0, [0.0, (1.0 + 2 * 3.0 + 8 * 0.5) / 11]])
    torch.testing.assert_close(loose, want4)


def test_row_clip_stops_one_rows_push_that_norm_clip_lets_through():
    """A promoter that puts its whole budget into one product's row passes a bound on the whole
    delta's norm, but not a bound on that row."""
    honest = [rows_message([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.1, 0.0]], 10) for _ in range(3)]
    evil = rows_message([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 2.0]], 10)  # the same norm, in row 3
    whole = robust_delta([*honest, evil], "norm_clip")["item_emb.weight"]
    rows = robust_delta([*honest, evil], "row_clip")["item_emb.weight"]
    assert whole[3].norm() > 0.4  # norm_clip: the push goes through (2.0 / 4 merchants)
    assert rows[3].norm() < 0.11  # row_clip: the row is held to about what honest shops moved it


def test_foolsgold_weights_by_hand():
    def delta(*x: float) -> dict[str, torch.Tensor]:
        return {"item_emb.weight": torch.tensor([x])}

    # cosines: a-b 0.6, a-c -0.6, b-c 0.28, d and e orthogonal to all; largest per merchant 0.6, 0.6,
    # 0.28, 0, 0. Pardoning scales c's similarities by 0.28 / 0.6 (a and b are each more alike to
    # someone else): c-b becomes 0.1307. 1 - largest: 0.4, 0.4, 0.8693, 1, 1; over the median
    # (0.8693): 0.4601, 0.4601, then 0.99 for the rest; ln(a / (1 - a)) + 0.5 clipped to [0, 1]:
    # 0.3401, 0.3401, 1, 1, 1. (Without pardoning c's 1 - 0.28 would be the median: 0.7231 for a, b.)
    abcde = [delta(1, 0, 0, 0), delta(0.6, 0.8, 0, 0), delta(-0.6, 0.8, 0, 0), delta(0, 0, 1, 0), delta(0, 0, 0, 1)]
    want = torch.tensor([0.3401, 0.3401, 1.0, 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(foolsgold_weights(abcde), want, atol=1e-4, rtol=0)
    # twins (any length) get 0, merchants unlike any other 1
    twins = foolsgold_weights([delta(1, 0, 0, 0), delta(5, 0, 0, 0), *abcde[2:]])
    torch.testing.assert_close(twins, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0], dtype=torch.float64))
    # with half the merchants or more in twins, the median factor is 0: nothing to tell apart, all 1
    most = foolsgold_weights([delta(1, 0, 0, 0), delta(5, 0, 0, 0), delta(0, 1, 0, 0)])
    torch.testing.assert_close(most, torch.ones(3, dtype=torch.float64))


def test_row_clip_foolsgold_stops_colluders_that_row_clip_adds_up():
    """Each of three colluders passes a per-merchant row bound; together they push the target's row
    (row 2) three times as far, the same way, against what honest shops did to it. Their updates,
    clipped, are alike, so FoolsGold weighs them 0 and the honest shops 1."""

    def table(rows: list[list[float]]) -> dict[str, torch.Tensor]:
        return merchant_sums({"item_emb.weight": torch.tensor(rows)}, 10, 1, torch.ones(3, dtype=torch.bool), 0.0,
                             "fedavg", False)  # fmt: skip

    honest = [
        table([[1, 0], [0, 1], [0.1, 0]]),
        table([[0, 1], [1, 0], [-0.1, 0]]),
        table([[-1, 0], [0, -1], [0, -0.1]]),
        table([[0, -1], [-1, 0], [0.1, 0]]),
    ]
    evil = [table([[0, 0], [0, 0], [0, 5]]) for _ in range(3)]
    # row 2's norms 0.1 (honest) and 5 (colluders): median 0.1, so each colluder adds (0, 0.1)
    clipped = [{"item_emb.weight": m["delta/item_emb.weight"] / m["n"]} for m in honest]
    clipped += [{"item_emb.weight": torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.1]])}] * 3
    torch.testing.assert_close(foolsgold_weights(clipped), torch.tensor([1.0] * 4 + [0.0] * 3, dtype=torch.float64))
    rows = robust_delta([*honest, *evil], "row_clip")["item_emb.weight"]
    sybil = robust_delta([*honest, *evil], "row_clip_foolsgold")["item_emb.weight"]
    torch.testing.assert_close(rows[2], torch.tensor([0.1, -0.1 + 3 * 0.1]) * 10 / 70)
    # the colluders' terms are gone; the denominator stays row_clip's (the honest shops' steps, not their mean)
    torch.testing.assert_close(sybil[2], torch.tensor([0.1, -0.1]) * 10 / 70)
    torch.testing.assert_close(sybil[:2], robust_delta(honest, "row_clip")["item_emb.weight"][:2] * 40 / 70)


def test_row_clip_foolsgold_cuts_no_honest_shop_next_to_a_lone_attacker():
    """Honest shops alike to each other, next to one merchant unlike all of them: scaled to the most
    distinct merchant (the paper), FoolsGold would cut every honest shop and leave the attacker's
    push alone; scaled to the median merchant, nobody is cut, and the rule is row_clip."""

    def table(rows: list[list[float]]) -> dict[str, torch.Tensor]:
        return merchant_sums({"item_emb.weight": torch.tensor(rows)}, 10, 1, torch.ones(2, dtype=torch.bool), 0.0,
                             "fedavg", False)  # fmt: skip

    honest = [table([[1, 0.1 * i], [0.1, 0]]) for i in range(4)]  # cosines 0.95 to 1 among them
    evil = table([[0, 1], [0, 5]])  # row 1 is the target's
    deltas = [{"item_emb.weight": m["delta/item_emb.weight"] / m["n"]} for m in [*honest, evil]]
    torch.testing.assert_close(foolsgold_weights(deltas), torch.ones(5, dtype=torch.float64))
    rows = robust_delta([*honest, evil], "row_clip")["item_emb.weight"]
    torch.testing.assert_close(robust_delta([*honest, evil], "row_clip_foolsgold")["item_emb.weight"], rows)


def test_one_boosted_merchant_moves_fedavg_at_will_but_not_the_robust_rules():
    honest = [message([1.0, 1.0], 10), message([1.2, 0.8], 10), message([0.9, 1.1], 10)]
    evil = message([-1000.0, 1000.0], 10_000)
    total = {k: sum(m[k] for m in [*honest, evil]) for k in evil}
    fedavg = total["delta/item_emb.weight"] / total["n"]
    assert fedavg[0, 0] < -900
    for rule in ("median", "trimmed_mean", "norm_clip", "row_clip", "row_clip_foolsgold"):
        got = robust_delta([*honest, evil], rule, trim=0.25)["item_emb.weight"]
        assert got.abs().max() < 2.5, rule


def test_colluders_push_the_same_direction_and_leave_honest_messages_alone():
    """Colluding promoters share one random stream: the same crafted target row, round after round."""
    state = {"item_emb.weight": torch.randn(6, 4, generator=torch.Generator().manual_seed(0))}
    hooks = [promote(name, 2, np.array([0, 1]), 1.0, False, seed=7) for name in ("m1", "m2")]
    both = colluding(hooks)

    def table(value: float) -> dict[str, torch.Tensor]:
        return merchant_sums({"item_emb.weight": torch.full((6, 4), value)}, 5, 1, torch.ones(6, dtype=torch.bool),
                             0.0, "fedavg", False)  # fmt: skip

    for _ in range(3):  # each round draws one direction per attacker, the same for both
        a = both("m1", table(0.0), state)["delta/item_emb.weight"]
        b = both("m2", table(0.0), state)["delta/item_emb.weight"]
        torch.testing.assert_close(a[2], b[2])
        assert a[2].norm() > 0 and a[0].norm() == 0  # only the target's row is crafted
    honest = table(1.0)
    untouched = both("shop", honest, state)
    assert all(untouched[k] is honest[k] for k in honest)


def test_camouflaged_colluders_push_the_same_row_but_look_unalike():
    """An attacker that knows the similarity defence hides under noise of its own: every other row
    gets noise of `camouflage` times its norm, so two colluders' updates are far less alike, while
    the target's row is what it was."""
    state = {"item_emb.weight": torch.randn(50, 8, generator=torch.Generator().manual_seed(0))}
    trained = {"item_emb.weight": torch.randn(50, 8, generator=torch.Generator().manual_seed(1))}
    msg = merchant_sums(trained, 5, 1, torch.ones(50, dtype=torch.bool), 0.0, "fedavg", False)
    key = "delta/item_emb.weight"

    def sent(camouflage: float) -> tuple[torch.Tensor, torch.Tensor]:
        hooks = [promote(name, 2, np.array([0, 1]), 1.0, False, seed=7, camouflage=camouflage) for name in ("m1", "m2")]
        both = colluding(hooks)
        return both("m1", msg, state)[key], both("m2", msg, state)[key]

    a, b = sent(0.0)
    c, d = sent(2.0)
    torch.testing.assert_close(c[2], a[2])  # the push is unchanged
    torch.testing.assert_close(d[2], b[2])
    others = torch.arange(50) != 2  # once the target's row is clipped, these are what the cosine sees

    def cos(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.nn.functional.cosine_similarity(x[others].flatten(), y[others].flatten(), dim=0))

    assert cos(a, b) > 0.99 and cos(c, d) < 0.5  # about 1 / (1 + 2^2) with camouflage 2
    noise = (c - a)[others].norm(dim=1)
    torch.testing.assert_close(noise, 2.0 * a[others].norm(dim=1))


def test_the_crafted_row_points_fresh_fixed_or_at_the_popular_products():
    """'fresh' draws a new direction every round; 'fixed' keeps the first; 'popular' points at the
    mean of the popular products' received rows (where most customers' vectors point)."""
    popular = np.array([0, 1])
    msg = merchant_sums({"item_emb.weight": torch.zeros(6, 4)}, 5, 1, torch.ones(6, dtype=torch.bool), 0.0,
                        "fedavg", False)  # fmt: skip

    def pushes(direction: str) -> list[torch.Tensor]:
        hook = promote("m", 2, popular, 1.0, False, seed=7, direction=direction)
        out = []
        for rnd in range(3):  # the received table changes every round
            state = {"item_emb.weight": torch.randn(6, 4, generator=torch.Generator().manual_seed(rnd))}
            goal = hook("m", msg, state)["delta/item_emb.weight"][2] / 5 + state["item_emb.weight"][2]
            out.append((goal / goal.norm(), state))
        return out

    def cos(x: torch.Tensor, y: torch.Tensor) -> float:
        return float(torch.dot(x, y))

    fresh, fixed, toward = pushes("fresh"), pushes("fixed"), pushes("popular")
    assert cos(fresh[0][0], fresh[1][0]) < 0.99 and cos(fresh[1][0], fresh[2][0]) < 0.99
    assert cos(fixed[0][0], fixed[1][0]) > 0.9999 and cos(fixed[0][0], fixed[2][0]) > 0.9999
    torch.testing.assert_close(fixed[0][0], fresh[0][0])  # the first round's draw, kept
    for unit, state in toward:
        mean = state["item_emb.weight"][popular].mean(dim=0)
        assert cos(unit, mean / mean.norm()) > 0.9999
    with pytest.raises(ValueError, match="direction 'up'"):
        promote("m", 2, popular, 1.0, False, direction="up")


def test_bad_robust_settings_are_refused():
    with pytest.raises(ValueError, match="robust rule"):
        robust_delta([message([1.0], 1)], "mean")
    with pytest.raises(ConfigError, match="federation.robust"):
        load_config(None, {"federation.robust": "krum"})
    with pytest.raises(ConfigError, match="federation.trim"):
        load_config(None, {"federation.trim": 0.5})
    with pytest.raises(ConfigError, match="federation.clip_multiple"):
        load_config(None, {"federation.clip_multiple": 0.9})
    with pytest.raises(ConfigError, match="fedavg"):
        load_config(None, {"federation.robust": "median", "federation.aggregation": "rowwise"})


def test_the_fake_merchant_bought_the_target_and_popular_products_only(tiny_dataset):
    popular = np.array([3, 5, 7, 9, 11])
    fake = fake_merchant(tiny_dataset.n_items, 42, popular, customers=30, filler=3, seed=0)
    assert fake.train.shape == (30, tiny_dataset.n_items)
    assert (fake.train[:, 42].toarray() == 1).all() and (fake.train.getnnz(axis=1) == 4).all()
    assert set(np.flatnonzero(fake.train.sum(axis=0))) <= {42, *popular}
    assert fake.val.nnz == 0 and fake.test.nnz == 0  # never validated or scored


def promotion_exposures(
    ds: FederatedDataset, model: ModelConfig, feds: dict[str, FederationConfig], customers: int, strength: float
) -> dict[tuple[str, str], float]:
    """Target exposure with and without one fake merchant (`customers` made-up customers, its
    crafted row `strength` x the longest other) promoting an unpopular product, per named config."""
    features = build_item_features(ds.items, model.hash_buckets)
    counts = np.asarray(pooled(ds).full_train.sum(axis=0)).ravel()
    popular = np.argsort(-counts, kind="stable")[:20]
    target = pick_target(counts, 0)
    attacker = fake_merchant(ds.n_items, target, popular, customers, 4, 0)
    poisoned = dataclasses.replace(ds, merchants=[*ds.merchants, attacker])
    out = {}
    for name, fed in feds.items():
        for label, data, tamper in (
            ("clean", ds, None),
            ("attacked", poisoned, promote(attacker.name, target, popular, 100.0, fed.normalize_steps, strength, 0)),
        ):
            res = run_federated(data, features, model, LocalConfig(), fed, tamper=tamper)
            vecs = item_embeddings(res.item_state, features, model)
            out[name, label] = exposure(ds.merchants, res.user_embeddings, vecs, res.item_biases, target)
    return out


@pytest.fixture(scope="module")
def promotion(tiny_dataset):
    """Target exposure with and without the attacker, for FedAvg and each robust rule."""
    rules = ("none", "median", "trimmed_mean", "norm_clip", "row_clip", "row_clip_foolsgold")
    feds = {rule: FederationConfig(rounds=6, patience=0, robust=rule, trim=0.25) for rule in rules}
    return promotion_exposures(
        tiny_dataset, ModelConfig(dim=16, use_content=False, merchant_item_bias=True), feds, 50, 20.0
    )


def test_the_promotion_attack_succeeds_under_fedavg(promotion):
    assert promotion["none", "clean"] < 0.02
    assert promotion["none", "attacked"] > 0.2


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "norm_clip", "row_clip", "row_clip_foolsgold"])
def test_robust_aggregation_stops_the_promotion_attack(promotion, rule):
    assert promotion[rule, "attacked"] < 0.02


def test_a_second_poisoning_report_reuses_the_clean_runs(tiny_csv, monkeypatch):
    """The colluders' section trains the same clean models as the one-attacker section: it takes
    them from the first instead of training them again, and reports the same clean figures."""
    from rich.console import Console

    import fedrec.training.attack_report as attack_report
    from fedrec.training.attack_report import PoisonConfig, poisoning_report

    cfg = load_config(None, {"data.dataset": "file", "data.path": str(tiny_csv), "local.temperature": 0.5,
                             "model.dim": 8, "model.hash_buckets": 256, "threads": 1})  # fmt: skip
    calls = []
    real = attack_report.run_federated
    monkeypatch.setattr(attack_report, "run_federated", lambda *a, **k: calls.append(k["tamper"]) or real(*a, **k))
    pc = PoisonConfig(rounds=2, seeds=(0, 1), rules=("none", "row_clip"))
    clean: dict = {}
    one = poisoning_report(cfg, Console(quiet=True), pc, clean)
    assert len(calls) == 8 and sum(t is None for t in calls) == 4  # 2 rules x 2 seeds, clean and attacked
    two = poisoning_report(cfg, Console(quiet=True), dataclasses.replace(pc, attackers=2), clean)
    assert len(calls) == 12 and all(t is not None for t in calls[8:])  # attacked runs only
    for rule in one["rules"]:
        for a, b in zip(one["rules"][rule]["runs"], two["rules"][rule]["runs"], strict=True):
            assert {k: v for k, v in a.items() if k.startswith("clean")} == {
                k: v for k, v in b.items() if k.startswith("clean")
            }


def test_the_push_through_token_rows_moves_only_the_targets_tokens_along_the_crafted_row():
    """`--through tokens`: the attacker also moves the target's content-token rows, each within
    `strength` times the longest other token row, so that the target's content vector (under the
    received tower) points where its crafted id row does; no other row of the token table changes,
    and camouflage leaves them."""
    cfg = ModelConfig(dim=8, feature_dim=8, hidden=16, hash_buckets=32)
    tokens = torch.randint(0, 32, (10, 3), generator=torch.Generator().manual_seed(0))
    tokens[2] = torch.tensor([5, 7, 32])  # 32 is padding: the target has tokens 5 and 7
    torch.manual_seed(0)
    state = {k: v.detach().clone() for k, v in ItemTower(10, cfg).state_dict().items()}
    trained = {k: 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in state.items()}
    msg = merchant_sums(trained, 5, 1, torch.ones(10, dtype=torch.bool), 0.0, "fedavg", False)
    own = torch.tensor([5, 7])

    def sent(through_tokens: bool, camouflage: float = 0.0) -> dict[str, torch.Tensor]:
        hook = promote("m", 2, np.array([0, 1]), 1.0, False, seed=3, direction="fixed", camouflage=camouflage,
                       tokens=own if through_tokens else None)  # fmt: skip
        return hook("m", msg, state)

    plain, pushed = sent(False), sent(True)
    key = "delta/feat_emb.weight"
    assert torch.nonzero((pushed[key] - plain[key]).norm(dim=1)).ravel().tolist() == [5, 7]
    torch.testing.assert_close(pushed["delta/item_emb.weight"], plain["delta/item_emb.weight"])
    goal = plain["delta/item_emb.weight"][2] / 5 + state["item_emb.weight"][2]  # the crafted id row
    moved = pushed_token_rows(state, own, goal, strength=20.0)
    torch.testing.assert_close(pushed[key][own], 5 * (moved - state["feat_emb.weight"][own]))  # weighted by n
    others = torch.ones(33, dtype=torch.bool)
    others[own] = False
    assert moved.norm(dim=1).max() <= 20 * state["feat_emb.weight"][others].norm(dim=1).max() * (1 + 1e-5)

    tower = ItemTower(10, dataclasses.replace(cfg, use_item_id=False))  # the content part alone
    tower.load_state_dict({k: v for k, v in state.items() if not k.startswith("item_emb")})

    def content_along(rows: torch.Tensor) -> float:
        table = state["feat_emb.weight"].clone()
        table[own] = rows
        tower.feat_emb.weight.data = table
        with torch.no_grad():
            return float(tower(ItemFeatures(tokens, 32))[2] @ (goal / goal.norm()))

    after = content_along(moved)
    assert after > content_along(state["feat_emb.weight"][own]) + 0.3
    bound = 20 * state["feat_emb.weight"][others].norm(dim=1).max()
    rng = torch.Generator().manual_seed(2)
    for _ in range(200):  # the climb beats any random pair of rows within the bound
        rows = torch.randn(2, 8, generator=rng)
        assert content_along(bound * rows / rows.norm(dim=1, keepdim=True)) < after
    hidden = sent(True, camouflage=2.0)
    torch.testing.assert_close(hidden[key][own], pushed[key][own])  # camouflage leaves the pushed rows
    bare = promote("m", 2, np.array([0, 1]), 1.0, False, seed=3, direction="fixed", tokens=own[:0])("m", msg, state)
    torch.testing.assert_close(bare, plain)  # a target without content tokens: only its id row is pushed
    assert (hidden[key][others] - pushed[key][others]).norm() > 0


def test_the_sum_clip_bounds_each_row_of_the_aggregate_by_its_tensors_median_moving_row():
    """federation.sum_clip reads the round's sum only (what SecAgg+ leaves): each row of the averaged
    delta at most m x the median norm of that tensor's nonzero rows; rows nobody moved stay out of
    the median; 1-D tensors pass."""
    delta = {
        "item_emb.weight": torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0], [0.0, 0.0], [60.0, 80.0]]),
        "mlp.0.bias": torch.tensor([100.0, 0.0]),
    }
    # nonzero row norms 5, 1, 2, 100 (the zero row left out) -> median 2 (torch's median of an even
    # count is the lower middle one); m = 2 -> bound 4: rows 0 (5) and 4 (100) scaled to norm 4
    got = clip_rows_of_sum(delta, 2.0)
    want = torch.tensor([[2.4, 3.2], [0.0, 1.0], [0.0, 2.0], [0.0, 0.0], [2.4, 3.2]])
    torch.testing.assert_close(got["item_emb.weight"], want)
    assert got["mlp.0.bias"] is delta["mlp.0.bias"]
    assert clip_rows_of_sum(delta, 100.0)["item_emb.weight"][4].norm() == 100  # the bound above every row
    with pytest.raises(ValueError, match="multiple"):
        clip_rows_of_sum(delta, 0.0)
    # the sum form: a boosted promoter's row of the average is cut back; the honest rows are not
    honest = [rows_message([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.1, 0.0]], 10) for _ in range(3)]
    evil = rows_message([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 200.0]], 1000)
    total = {k: sum(m[k] for m in [*honest, evil]) for k in evil}
    plain = delta_from_sums(total, "fedavg", {}, False, 5.0, 0.0)["item_emb.weight"]
    bounded = delta_from_sums(total, "fedavg", {}, False, 5.0, 0.0, sum_clip=2.0)["item_emb.weight"]
    assert plain[3].norm() > 190 and bounded[3].norm() < 2 * plain[:3].norm(dim=1).median() + 1e-6
    torch.testing.assert_close(bounded[:3], plain[:3])


def test_the_sum_clip_is_refused_beside_a_robust_rule_or_the_exact_item_step():
    with pytest.raises(ConfigError, match="federation.sum_clip must be 0"):
        load_config(None, {"federation.sum_clip": 0.5})
    with pytest.raises(ConfigError, match="choose one"):
        load_config(None, {"federation.sum_clip": 2, "federation.robust": "median"})
    exact = {"local.loss": "ials", "local.ials_item_step": "exact", "model.use_content": False}
    with pytest.raises(ConfigError, match="set federation.sum_clip = 0"):
        load_config(None, {**exact, "federation.sum_clip": 2})
    assert load_config(None, {"federation.sum_clip": 4}).federation.sum_clip == 4
