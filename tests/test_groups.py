"""Secure groups: the robust rules over group sums (what one secure sum per group shows). The groups
by hand, the bound on one spoiled group, the refusals, and the promotion attack end to end on a
shop of nine merchants: it succeeds under FedAvg and fails under row_clip over three group sums."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from fedrec.config import load_config
from fedrec.data import PurchaseLog
from fedrec.datasets.protocol import temporal_split
from fedrec.datasets.synthetic import SyntheticConfig, generate
from fedrec.errors import ConfigError
from fedrec.features import build_item_features
from fedrec.federated.aggregation import add_sums, aggregate_sums, merchant_sums, sum_all
from fedrec.federated.groups import assign_groups, check_groups, group_sums
from fedrec.federated.local import LocalConfig
from fedrec.federated.robust import robust_delta
from fedrec.federated.simulation import FederationConfig, run_federated
from fedrec.model import ModelConfig
from tests.test_poisoning import promotion_exposures

TABLE = "item_emb.weight"


def message(rows: list[list[float]], n: int) -> dict[str, torch.Tensor]:
    d = {TABLE: torch.tensor(rows)}
    return merchant_sums(d, n, 1, torch.ones(len(rows), dtype=torch.bool), 0.0, "fedavg", False)


def test_groups_split_the_round_once_each_evenly_and_anew_each_round():
    for n, g in ((9, 3), (10, 3), (14, 4), (1000, 30)):
        groups = assign_groups(n, g, seed=5, rnd=1)
        assert len(groups) == g
        assert sorted(np.concatenate(groups).tolist()) == list(range(n))  # every merchant exactly once
        sizes = [len(x) for x in groups]
        assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 3
    same = assign_groups(12, 3, seed=5, rnd=2)
    assert all((a == b).all() for a, b in zip(same, assign_groups(12, 3, seed=5, rnd=2), strict=True))
    later = assign_groups(12, 3, seed=5, rnd=3)
    assert any(set(a) != set(b) for a, b in zip(same, later, strict=True))  # drawn anew each round


def test_group_sums_are_the_sums_of_their_members():
    msgs = [message([[float(i), 1.0]], i + 1) for i in range(9)]
    sums = group_sums(msgs, 3, seed=0, rnd=1)
    for idx, got in zip(assign_groups(9, 3, seed=0, rnd=1), sums, strict=True):
        want = None
        for i in idx:
            want = add_sums(want, msgs[i])
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k])


def test_row_clip_over_group_sums_bounds_one_boosted_merchant_that_the_sum_lets_through():
    """Eight honest merchants move row 0 a little; one claims 100x the purchases and moves it far.
    The plain weighted mean follows the attacker; row_clip over three group sums bounds its group's
    row by the median group's, as row_clip bounds one merchant by the median merchant."""
    gen = torch.Generator().manual_seed(0)
    honest = [message((0.1 * torch.randn(2, 4, generator=gen)).tolist(), 50) for _ in range(8)]
    attacker = message([[10.0, 10.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]], 5000)
    msgs = [*honest, attacker]
    fedavg = aggregate_sums(sum_all(msgs), "fedavg")[TABLE]
    assert fedavg[0].norm() > 15  # the attacker's row, almost whole
    groups = group_sums(msgs, 3, seed=0, rnd=1)
    grouped = robust_delta(groups, "row_clip")[TABLE]
    group_rows = torch.stack([aggregate_sums(g, "fedavg")[TABLE][0] for g in groups]).norm(dim=1)
    assert grouped[0].norm() <= group_rows.median() * 1.0001  # within the median group's row
    assert grouped[0].norm() < 0.2
    median = robust_delta(groups, "median")[TABLE]
    assert median[0].abs().max() < 0.2  # the median of three group means drops the spoiled one


def test_groups_are_refused_when_a_round_cannot_fill_them_or_without_a_robust_rule():
    with pytest.raises(ConfigError, match="fewer than 3 group sums"):
        check_groups(12, 2)
    with pytest.raises(ConfigError, match="needs at least 9 merchants a round"):
        check_groups(8, 3)
    with pytest.raises(ConfigError, match="robust_groups must be 0"):
        load_config(None, {"federation.robust": "row_clip", "federation.robust_groups": 2})
    with pytest.raises(ConfigError, match="set federation.robust too"):
        load_config(None, {"federation.robust_groups": 3})
    cfg = load_config(None, {"federation.robust": "row_clip", "federation.robust_groups": 3})
    assert cfg.federation.robust_groups == 3


NINE = SyntheticConfig(
    n_products=150,
    merchants=tuple((f"shop{i}", 50 + 5 * i) for i in range(9)),
    mean_baskets=8.0,
    style_weight=4.0,
    seed=11,
)


@pytest.fixture(scope="module")
def nine_shops():
    purchases, products = generate(NINE)
    return temporal_split(PurchaseLog("nine", purchases, products.with_columns(tags=pl.lit(None, dtype=pl.String))))


def test_too_few_merchants_for_the_groups_fail_before_training(nine_shops):
    ds = dataclasses.replace(nine_shops, merchants=nine_shops.merchants[:8])
    model = ModelConfig(dim=8, use_content=False)
    features = build_item_features(ds.items, model.hash_buckets)
    fed = FederationConfig(rounds=1, patience=0, robust="row_clip", robust_groups=3)
    with pytest.raises(ConfigError, match="needs at least 9 merchants a round"):
        run_federated(ds, features, model, LocalConfig(), fed)


def test_row_clip_over_three_group_sums_stops_the_promotion_attack(nine_shops):
    """The crafted row is 100x the longest other (20x on the tiny shop): among nine similar shops
    one fake merchant needs the longer push to reach customers under the sum."""
    feds = {
        "sum": FederationConfig(rounds=6, patience=0),
        "groups": FederationConfig(rounds=6, patience=0, robust="row_clip", robust_groups=3),
    }
    got = promotion_exposures(
        nine_shops, ModelConfig(dim=16, use_content=False, merchant_item_bias=True), feds, 60, 100.0
    )
    assert got["sum", "clean"] < 0.02 and got["groups", "clean"] < 0.02
    assert got["sum", "attacked"] > 0.15  # the default rule (rowwise): 0.23 when written
    assert got["groups", "attacked"] < 0.02


def test_the_leakage_report_attacks_the_sum_over_the_targets_group(nine_shops, tmp_path):
    """What a secure sum per group leaves the coordinator: the sum over the target's group of round 1
    (the groups the run would draw). It names the sold set better than the sum over all nine shops,
    worse than the merchant's own update."""
    from rich.console import Console

    from fedrec.training.attack_report import leakage_report

    purchases, products = generate(NINE)
    path = tmp_path / "nine.csv"
    purchases.join(products, on="item").write_csv(path)
    sets = {"data.dataset": "file", "data.path": str(path), "model.dim": 8, "model.hash_buckets": 256,
            "model.use_content": False, "threads": 1}  # fmt: skip
    out = leakage_report(load_config(None, sets), 8.0, 20, Console(quiet=True), groups=3)["leakage"]
    row = out["secagg_groups3"]
    assert set(row["per_merchant"]) == {f"shop{i}" for i in range(9)}
    assert out["none"]["auc"] > row["auc"] > out["secagg_sum"]["auc"]
    with pytest.raises(ConfigError, match="needs at least 12 merchants a round"):
        leakage_report(load_config(None, sets), 8.0, 20, Console(quiet=True), groups=4)


def test_the_networked_runtime_runs_a_robust_rule_only_over_groups_it_can_fill():
    from fedrec.config import check_networked

    with pytest.raises(ConfigError, match="over the sums of random groups"):
        check_networked(load_config(None, {"federation.robust": "row_clip"}))
    grouped = {"federation.robust": "row_clip", "federation.robust_groups": 3}
    with pytest.raises(ConfigError, match="needs network.min_merchants >= 9"):
        check_networked(load_config(None, grouped))
    check_networked(load_config(None, {**grouped, "network.min_merchants": 9}))
