"""Marketplace scale: compositional item ids, upload encodings, the large-catalogue switch,
sampled validation, the generated marketplace and the CI-sized `make bench-train`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedrec.datasets.marketplace import MarketplaceConfig, generate, merchant_sizes
from fedrec.errors import ConfigError
from fedrec.evaluation import evaluate_val, merchant_metric_sums, sample_customers
from fedrec.features import ItemFeatures, build_item_features
from fedrec.federated.aggregation import add_sums, merchant_sums, sum_names
from fedrec.federated.local import LocalConfig, local_update
from fedrec.federated.simulation import FederationConfig, run_federated
from fedrec.federated.upload import (
    dense_bytes,
    from_touched_rows,
    round_delta,
    sparse_row_bytes,
    touched_rows,
)
from fedrec.losses import sampled_softmax_loss
from fedrec.model import ItemTower, ModelConfig, id_vectors, init_user_embeddings, item_tower_shapes, new_item_tower
from tests.toy_merchant import toy_merchant

SMALL_MODEL = ModelConfig(dim=8, feature_dim=8, hidden=16, hash_buckets=64)


def test_compositional_ids_fix_the_tower_size_whatever_the_catalogue():
    cfg = dataclasses.replace(SMALL_MODEL, id_rows=32)
    assert item_tower_shapes(1_000, cfg) == item_tower_shapes(1_000_000, cfg)
    assert item_tower_shapes(1_000, cfg)["item_emb.weight"] == (32, 8)
    # up to 2R products: one row per product; id_rows = 0: always one row per product
    assert item_tower_shapes(64, cfg)["item_emb.weight"] == (64, 8) and "item_emb_q.weight" not in item_tower_shapes(
        64, cfg
    )
    assert item_tower_shapes(65, cfg)["item_emb_q.weight"] == (32, 8)
    assert item_tower_shapes(1_000_000, dataclasses.replace(cfg, id_rows=0))["item_emb.weight"] == (1_000_000, 8)


def test_rowwise_needs_one_id_row_per_product():
    cfg = dataclasses.replace(SMALL_MODEL, id_rows=32)
    sum_names(item_tower_shapes(64, cfg), "rowwise")  # one row per product: fine
    with pytest.raises(ConfigError, match="compositional"):
        sum_names(item_tower_shapes(65, cfg), "rowwise")


def test_compositional_ids_give_every_product_its_own_pair_of_rows():
    r = 16
    ids = torch.arange(r * r)
    first, second = ids % r, (ids // r + ids * 40503) % r
    pairs = set(zip(first.tolist(), second.tolist(), strict=True))
    assert len(pairs) == r * r  # unique for i < R^2
    assert len(set(second.tolist())) == r  # every quotient row is used
    # and the tower's id vectors are the sum of exactly those rows
    weights = {"item_emb.weight": torch.randn(r, 4), "item_emb_q.weight": torch.randn(r, 4)}
    torch.testing.assert_close(
        id_vectors(weights, ids, r), weights["item_emb.weight"][first] + weights["item_emb_q.weight"][second]
    )


def test_a_tower_holds_only_the_parts_in_use():
    assert set(ItemTower(10, dataclasses.replace(SMALL_MODEL, use_item_id=False)).state_dict()) == {
        "feat_emb.weight", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
    }  # fmt: skip
    assert set(ItemTower(10, dataclasses.replace(SMALL_MODEL, use_content=False)).state_dict()) == {"item_emb.weight"}


def test_touched_rows_encoding_is_lossless_and_sums_the_same():
    gen = torch.Generator().manual_seed(0)
    deltas = []
    for k in range(3):
        t = torch.zeros(50, 4)
        rows = torch.randperm(50, generator=gen)[: 5 + k]
        t[rows] = torch.randn(len(rows), 4, generator=gen)
        deltas.append(t)
    dense_total = sparse_total = None
    for t in deltas:
        idx, rows = touched_rows(t)
        assert len(idx) == int((t.abs().sum(1) > 0).sum())
        decoded = from_touched_rows(idx, rows, 50)
        assert torch.equal(decoded, t)
        dense_total = add_sums(dense_total, {"d": t})
        sparse_total = add_sums(sparse_total, {"d": decoded})
    assert torch.equal(dense_total["d"], sparse_total["d"])
    # bytes: 5 rows x (4-byte index + 4 floats x 4 bytes) + a scalar weight
    assert sparse_row_bytes({"d": deltas[0], "n": torch.tensor(3.0)}) == 5 * (4 + 16) + 4
    assert dense_bytes({"d": deltas[0], "n": torch.tensor(3.0)}) == 50 * 4 * 4 + 4


def test_half_precision_halves_tensor_bytes_and_rounds_within_float16_precision():
    delta = {"w": torch.randn(100, 8) * 0.01}
    sums = merchant_sums(round_delta(delta, "float16"), 7, 2, torch.ones(100, dtype=torch.bool), 0.5, "fedavg", True)
    assert dense_bytes(sums, "float16") == 100 * 8 * 2 + 3 * 4  # weights stay 4-byte floats
    rounded = round_delta(delta, "float16")["w"]
    assert not torch.equal(rounded, delta["w"])  # lossy
    torch.testing.assert_close(rounded, delta["w"], rtol=1e-3, atol=1e-6)
    assert round_delta(delta, "float32")["w"] is delta["w"]
    with pytest.raises(ValueError, match="float8"):
        round_delta(delta, "float8")


def test_a_large_catalogue_switches_softmax_to_sampled_softmax_and_the_user_solve_to_its_sampled_form():
    train, features = toy_merchant()
    state = new_item_tower(features.n_items, SMALL_MODEL, 0).state_dict()
    users = init_user_embeddings(train.shape[0], SMALL_MODEL, torch.Generator().manual_seed(1))
    small_limit = LocalConfig(full_softmax_max_items=100, uniform_negatives=0)  # 300 items: above it
    switched = local_update(state, users, train, features, SMALL_MODEL, small_limit, seed=3)
    explicit = dataclasses.replace(small_limit, loss="sampled_softmax")
    same = local_update(state, users, train, features, SMALL_MODEL, explicit, seed=3)
    unsolved = local_update(
        state, users, train, features, SMALL_MODEL, dataclasses.replace(explicit, sampled_user_solve_reg=0.0), seed=3
    )  # fmt: skip
    assert not torch.equal(switched.user_embeddings, unsolved.user_embeddings)  # the solve stays on
    kept = local_update(state, users, train, features, SMALL_MODEL, LocalConfig(), seed=3)
    for k in state:
        assert torch.equal(switched.delta[k], same.delta[k])
    assert not torch.equal(switched.delta["item_emb.weight"], kept.delta["item_emb.weight"])
    # in-batch sampled softmax moves only the id rows of products in the batches: the sold set
    moved = switched.delta["item_emb.weight"].abs().sum(1) > 0
    assert torch.equal(moved, switched.touched_rows)
    # uniform negatives also move rows of products the merchant never sold
    mixed = local_update(
        state, users, train, features, SMALL_MODEL, dataclasses.replace(explicit, uniform_negatives=64), 3
    )
    moved_mixed = mixed.delta["item_emb.weight"].abs().sum(1) > 0
    assert bool((moved_mixed & ~mixed.touched_rows).any()) and bool((moved_mixed >= mixed.touched_rows).all())


def test_a_local_update_on_the_used_token_rows_equals_one_on_the_whole_table(monkeypatch):
    """Cutting the token table to the rows the catalogue uses changes no number, for each loss and
    with FedProx, and leaves every unused row's delta at exactly zero."""
    import fedrec.federated.local as local_module
    from fedrec.federated.token_rows import TABLE, token_rows

    train, _ = toy_merchant()
    rng = np.random.default_rng(1)
    model = ModelConfig(dim=8, feature_dim=8, hidden=16, hash_buckets=4096)
    tokens = torch.from_numpy(rng.choice(rng.choice(4096, 150, replace=False), (train.shape[1], 5)))
    tokens[::3, 3:] = model.hash_buckets  # shorter items, padded
    features = ItemFeatures(tokens, model.hash_buckets)
    cut = token_rows(features, model)
    assert cut is not None and len(cut.rows) == len(torch.unique(tokens)) - 1  # every used row, no padding
    wider = dataclasses.replace(model, dim=16)  # the same catalogue under another model keeps that model
    assert token_rows(features, wider).model_cfg == dataclasses.replace(wider, hash_buckets=len(cut.rows))
    state = new_item_tower(features.n_items, model, 0).state_dict()
    users = init_user_embeddings(train.shape[0], model, torch.Generator().manual_seed(1))
    unused = torch.ones(model.hash_buckets + 1, dtype=torch.bool)
    unused[cut.rows] = False
    for cfg in (
        LocalConfig(prox_mu=0.01),
        LocalConfig(loss="bpr", epochs=2),
        LocalConfig(loss="sampled_softmax", uniform_negatives=16),
    ):
        fast = local_update(state, users, train, features, model, cfg, seed=3)
        with monkeypatch.context() as m:
            m.setattr(local_module, "token_rows", lambda f, c: None)
            whole = local_update(state, users, train, features, model, cfg, seed=3)
        for k in state:
            assert torch.equal(fast.delta[k], whole.delta[k]), (cfg.loss, k)
        assert torch.equal(fast.user_embeddings, whole.user_embeddings) and fast.mean_loss == whole.mean_loss
        assert bool((fast.delta[TABLE][unused] == 0).all()) and bool((fast.delta[TABLE][cut.rows] != 0).any())


def test_mixed_negatives_correct_each_candidate_by_its_expected_count():
    """With K uniform negatives over N items and B in-batch ones, the loss is the cross-entropy
    over [s/T - log(B q), s'/T - log(K / N)], a row's own positive never counted as a negative."""
    gen = torch.Generator().manual_seed(0)
    u, v_pos, v_neg = (
        torch.randn(3, 4, generator=gen),
        torch.randn(3, 4, generator=gen),
        torch.randn(2, 4, generator=gen),
    )
    pos, neg = torch.tensor([0, 1, 2]), torch.tensor([1, 7])
    log_q = torch.log(torch.tensor([0.5, 0.3, 0.2] + [0.0] * 7) + 1e-9)
    got = sampled_softmax_loss(u, v_pos, pos, log_q, 0.5, None, v_neg, neg, 10)
    inbatch = u @ v_pos.T / 0.5 - torch.log(3 * torch.exp(log_q[pos]))[None, :]
    uniform = u @ v_neg.T / 0.5 - np.log(2 / 10)
    uniform[1, 0] = float("-inf")  # row 1's positive is item 1, drawn as a negative
    want = torch.nn.functional.cross_entropy(torch.cat([inbatch, uniform], 1), pos)
    torch.testing.assert_close(got, want)


def test_validation_on_a_sample_of_customers(tiny_dataset):
    m = tiny_dataset.merchants[0]
    rows = sample_customers(m.val, 5, seed=0)
    assert rows is not None and len(rows) == 5 and (m.val[rows].getnnz(axis=1) > 0).all()
    assert np.array_equal(rows, sample_customers(m.val, 5, seed=0))  # seeded
    assert sample_customers(m.val, 10**6, seed=0) is None  # everyone fits: all
    users = torch.randn(m.n_users, 8)
    items = torch.randn(tiny_dataset.n_items, 8)
    got = evaluate_val(m, users, items, rows=rows)
    want = merchant_metric_sums(users[torch.from_numpy(rows)], items, m.train[rows], m.val[rows], ("recall@20",))
    assert got == want and got.users == 5


def test_val_every_validates_only_those_rounds_and_the_last(tiny_dataset):
    features = build_item_features(tiny_dataset.items, SMALL_MODEL.hash_buckets)
    fed = FederationConfig(rounds=5, patience=0, val_every=2, val_customers=3)
    res = run_federated(tiny_dataset, features, SMALL_MODEL, LocalConfig(user_solve_reg=0.0), fed)
    validated = [h.round for h in res.history if h.val_recall_at_20 is not None]
    assert validated == [2, 4, 5]
    assert res.best_round in validated
    tower = new_item_tower(tiny_dataset.n_items, SMALL_MODEL, 0).state_dict()
    message = 4 * sum(v.numel() for v in tower.values()) + 3 * 4  # float32 deltas, three scalar weights
    # the default (auto) is rowwise here: also the per-row weights (n, n tau) and the row-wise id table
    rowwise = 4 * (2 * tiny_dataset.n_items + tower["item_emb.weight"].numel())
    assert {h.upload_bytes for h in res.history} == {message + rowwise}


def test_marketplace_log_is_seeded_skewed_and_consistent():
    cfg = MarketplaceConfig(n_products=3_000, n_merchants=30, n_customers=2_000, min_customers=10)
    purchases, products = generate(cfg)
    again, _ = generate(cfg)
    assert purchases.equals(again)
    assert products.height == 3_000
    assert set(purchases["item"].unique()) <= set(products["item"])
    sizes = merchant_sizes(cfg, np.random.default_rng(0))
    assert sizes.sum() == 2_000 and sizes.min() >= 10
    per_merchant = purchases.group_by("merchant").len()["len"].sort(descending=True).to_numpy()
    assert per_merchant[0] > 10 * per_merchant[-1]  # quantity skew: a few big shops, a long tail
    counts = purchases.group_by("item").len()["len"].sort(descending=True).to_numpy()
    assert counts[: len(counts) // 100].sum() > 5 * counts[-len(counts) // 100 :].sum()  # a popularity head
    with pytest.raises(ValueError, match="min_customers"):
        merchant_sizes(dataclasses.replace(cfg, n_customers=100), np.random.default_rng(0))


def run_small_bench_train(parts: str, out_dir) -> dict:  # noqa: ANN001
    """`make bench-train`'s CI-sized variant of some parts, in a fresh process; its results file."""
    cmd = [sys.executable, "-m", "fedrec.training.bench_train", "--small", "--parts", parts, "--out", str(out_dir)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads((out_dir / "bench-train.json").read_text())


def test_id_sharing_runs_merge_into_one_table():
    """`--sharing-id-rows` adds budgets to the last id_sharing table on the same catalogue (ratios to
    the dense run recomputed, commands kept); a run on another catalogue replaces it."""
    from fedrec.training.bench_train import merged_sharing, with_ratios_to_dense

    def run(variants: dict, items: int = 100, command: str = "a") -> dict:
        entries = {k: {"recall@20": r, "test_recall@20_without_prior": r / 2} for k, r in variants.items()}
        return with_ratios_to_dense(
            {"items": items, "merchants": 3, "rounds": 2, "seeds": [0], "variants": entries, "commands": [command]}
        )

    first = run({"dense": 0.04, "compositional_R16": 0.03})
    assert first["variants"]["compositional_R16"]["recall@20_vs_dense"] == pytest.approx(0.75)
    later = run({"compositional_R4": 0.02}, command="b")
    assert later["variants"]["compositional_R4"]["recall@20_vs_dense"] is None  # no dense run in it alone
    merged = merged_sharing(first, later)
    assert list(merged["variants"]) == ["dense", "compositional_R16", "compositional_R4"]
    assert merged["variants"]["compositional_R4"]["test_recall@20_without_prior_vs_dense"] == pytest.approx(0.5)
    assert merged["commands"] == ["a", "b"]
    elsewhere = run({"compositional_R4": 0.02}, items=200, command="c")
    assert merged_sharing(first, elsewhere) == elsewhere and merged_sharing(None, later) == later


def test_bench_train_small_variant(tmp_path):
    """The CI-sized `make bench-train`: every part's fields, and a compositional upload whose size
    is the same on two catalogue sizes."""
    res = run_small_bench_train("switch,losses,uploads,id_sharing,user_solve,als_reference,als_exact,large", tmp_path)
    assert {r["items"] for r in res["switch"]["rows"]} == {1_000, 5_000}
    assert set(res["losses"]["variants"]) == {"softmax", "sampled_in_batch", "sampled_mixed_1024"}
    assert all(r["softmax_ms_per_step"] > 0 and r["sampled_softmax_ms_per_step"] > 0 for r in res["switch"]["rows"])
    sent = {name: v["upload_bytes_per_merchant"] for name, v in res["uploads"]["variants"].items()}
    assert sent["touched_rows_fp32"] < sent["dense_fp32"] and sent["dense_fp16"] < sent["dense_fp32"]
    sharing = res["id_sharing"]  # dense against compositional ids, over two seeds, on the uploads catalogue
    assert sharing["items"] == res["uploads"]["items"] and sharing["seeds"] == [0, 1]
    dense, shared = sharing["variants"]["dense"], sharing["variants"]["compositional_R256"]
    assert dense["id_rows"] == 0 and dense["products_per_row"] == 1.0 and dense["recall@20_vs_dense"] == 1.0
    assert shared["id_rows"] == 256 and shared["products_per_row"] == pytest.approx(sharing["items"] / 256)
    assert shared["upload_bytes_per_merchant"] < dense["upload_bytes_per_merchant"]
    for v in (dense, shared):
        recalls = [r["recall@20"] for r in v["runs"]]
        assert [r["seed"] for r in v["runs"]] == [0, 1] and v["recall@20"] == pytest.approx(np.mean(recalls))
        assert v["recall@20_std"] == pytest.approx(np.std(recalls, ddof=1))
    assert shared["recall@20_vs_dense"] == pytest.approx(shared["recall@20"] / dense["recall@20"])
    assert "Compositional ids against one row per product" in (tmp_path / "bench-train.md").read_text()
    large = res["large"]
    assert large["merchants"] == 50 and large["merchants_per_round"] == 10 and large["items"] == 20_000
    assert large["upload_bytes_per_merchant"] == sent["compositional_fp32"]
    assert res["uploads"]["items"] < large["items_with_purchases"]  # two catalogue sizes, one upload size
    assert 0.0 <= large["recall@20"] <= 1.0 and large["peak_rss_mb"] > 0
    assert large["sampled_user_solve_reg"] > 0 and str(large["released_round"]) in large["val_recall@20_by_round"]
    solve = res["user_solve"]["variants"]
    assert set(solve) == {"sampled_user_solve_reg=0.0", "sampled_user_solve_reg=3.0"}
    for v in solve.values():
        assert list(v["val_recall@20_by_round"]) == ["1", "2"] and 0.0 <= v["test_recall@20"] <= 1.0
        assert v["val_recall@20_by_round"][str(v["released_round"])] == max(v["val_recall@20_by_round"].values())
        # above the switch the popularity prior is chosen on validation: its weight 0 is the released
        # round's validation score, and the weight kept scores the most
        prior = v["popularity_prior_val_recall@20"]
        assert prior["0.0"] == pytest.approx(v["val_recall@20_by_round"][str(v["released_round"])])
        assert prior[str(v["popularity_prior_weight"])] == max(prior.values())
        assert 0.0 <= v["test_recall@20_without_prior"] <= 1.0
    assert large["popularity_prior_weight"] in (0.0, 0.1, 0.3, 1.0, 3.0)
    als = res["als_reference"]  # chosen on validation from its small grid: the best of two fits
    assert set(als["val_recall@20"]) == {"factors=4,regularization=0.1,alpha=5", "factors=4,regularization=1,alpha=5"}
    kept = f"factors={als['settings']['factors']},regularization={als['settings']['regularization']:g},alpha=5"
    assert als["val_recall@20"][kept] == max(als["val_recall@20"].values()) and 0.0 <= als["test_recall@20"] <= 1.0
    fed_als = res["als_exact"]  # the exact item step above the softmax switch: one id row per product
    assert fed_als["items"] == res["user_solve"]["items"] > 1_000 and fed_als["settings"]["dim"] == 4
    assert fed_als["upload_bytes_per_merchant"] == 4 * (fed_als["items"] * (4 * 4 + 4) + 4 * 4)
    curve = fed_als["val_recall@20_by_round"]
    assert list(curve) == ["1", "2"] and curve[str(fed_als["released_round"])] == max(curve.values())
    assert 0.0 < fed_als["test_recall@20"] <= 1.0
    assert "Federated ALS (the exact item step" in (tmp_path / "bench-train.md").read_text()
    assert "Marketplace scale" in (tmp_path / "bench-train.md").read_text()
    assert "User solve above the switch" in (tmp_path / "bench-train.md").read_text()


@pytest.mark.slow
def test_flower_simulation_runs_fedrecs_own_apps_and_matches_the_in_process_recall(tmp_path):
    """The side-by-side's small variant (needs Ray: make simulation-setup; about 40 s): Flower's
    simulation engine runs fedrec's ServerApp and ClientApp on one virtual node per merchant, and
    with every merchant in every round it trains the same model as the in-process runtime (the
    same seeds, plaintext sums): test recall@20 equal up to float32 summation order."""
    pytest.importorskip("ray")
    (row,) = run_small_bench_train("flower_simulation", tmp_path)["flower_simulation"]
    assert row["merchants"] == row["merchants_per_round"] == 4 and row["rounds"] == 2
    assert row["fedrec_recall@20"] > 0.02  # trained, not an empty ranking
    assert abs(row["flower_recall@20"] - row["fedrec_recall@20"]) < 1e-3
    assert row["flower_seconds_per_round"] > 0 and row["fedrec_seconds_per_round"] > 0
    assert row["ratio"] == pytest.approx(row["flower_seconds_per_round"] / row["fedrec_seconds_per_round"])
    assert "simulation engine" in (tmp_path / "bench-train.md").read_text()


def test_a_tower_from_a_state_holds_a_copy_of_exactly_that_state():
    """Built without a random initialisation (tower_from_state): every tensor equals the state's,
    and training it leaves the state it came from untouched."""
    from fedrec.model import initial_item_state, tower_from_state

    cfg = ModelConfig(use_content=True, dim=8, hash_buckets=64, feature_dim=8, hidden=8)
    state = initial_item_state(30, cfg, seed=3)
    before = {k: v.clone() for k, v in state.items()}
    tower = tower_from_state(30, cfg, state)
    got = tower.state_dict()
    assert set(got) == set(state)
    for k in state:
        assert torch.equal(got[k], state[k]) and got[k].data_ptr() != state[k].data_ptr()
    assert all(p.requires_grad and p.device.type == "cpu" for p in tower.parameters())
    with torch.no_grad():
        for p in tower.parameters():
            p.add_(1.0)
    assert all(torch.equal(state[k], before[k]) for k in state)
    # Towers share one template: a second one holds its own state, and the first keeps its values.
    other = initial_item_state(30, cfg, seed=4)
    second = tower_from_state(30, cfg, other)
    assert all(torch.equal(second.state_dict()[k], other[k]) for k in other)
    assert all(torch.equal(tower.state_dict()[k], before[k] + 1.0) for k in state)
