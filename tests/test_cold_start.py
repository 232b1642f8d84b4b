"""New products: the whole catalogue is exported and served, and the cold-start measurement."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from fedrec.baselines import content_profile_scores
from fedrec.config import load_config
from fedrec.data import PurchaseLog, pooled
from fedrec.datasets.protocol import cold_start_split, temporal_split
from fedrec.features import ItemFeatures, build_item_features
from fedrec.federated.local import LocalConfig
from fedrec.federated.simulation import FederationConfig, run_federated
from fedrec.model import ItemTower, ModelConfig, catalogue_embeddings, content_neighbour_vectors, scoring_vectors
from fedrec.training.cold_start import recall_of_scores

MODEL = ModelConfig(dim=8, feature_dim=8, hidden=16, hash_buckets=512)


@pytest.fixture(scope="module")
def shop_with_unsold(tiny_frames):
    """The tiny shop plus 5 catalogue products nobody bought (one a copy of a sold product's metadata)."""
    purchases, products = tiny_frames
    sold = products.filter(pl.col("item").is_in(purchases["item"].unique().implode()))
    twin = sold.head(1).with_columns(item=pl.lit("NEW-twin"))
    others = sold.slice(1, 4).with_columns(item=pl.format("NEW-{}", pl.int_range(4)))
    items = pl.concat([products, twin, others]).with_columns(tags=pl.lit(None, dtype=pl.String))
    return temporal_split(PurchaseLog("tiny", purchases, items)), sold["item"][0]


def test_products_nobody_bought_are_kept_as_new_items_not_trained(shop_with_unsold):
    ds, _ = shop_with_unsold
    assert ds.new_items is not None and ds.new_items.height >= 5
    assert set(ds.new_items["item"]).isdisjoint(set(ds.items["item"]))
    assert {f"NEW-{i}" for i in range(4)} | {"NEW-twin"} <= set(ds.new_items["item"])
    assert all(m.train.shape[1] == ds.n_items for m in ds.merchants)  # the matrices cover sold products only


def test_new_products_get_the_content_tower_alone_or_their_content_neighbours(shop_with_unsold):
    ds, twin = shop_with_unsold
    catalogue = pl.concat([ds.items, ds.new_items.select(ds.items.columns)])
    features = build_item_features(catalogue, MODEL.hash_buckets)
    torch.manual_seed(0)
    tower = ItemTower(ds.n_items, MODEL)
    state = tower.state_dict()
    vecs = catalogue_embeddings(state, features, MODEL)
    assert vecs.shape == (catalogue.height, MODEL.dim)
    with torch.no_grad():
        content = tower.mlp(tower.feat_emb(features.tokens))
        trained = tower(dataclasses.replace(features, tokens=features.tokens[: ds.n_items]))
    torch.testing.assert_close(vecs[: ds.n_items], trained)
    torch.testing.assert_close(vecs[ds.n_items :], content[ds.n_items :])  # no id row: content alone
    # Without a content tower: the trained vectors weighted by content similarity; the new twin
    # of a sold product (same title, category and price) is closest to that product's vector.
    id_only = dataclasses.replace(MODEL, use_content=False, dim=64)
    state = ItemTower(ds.n_items, id_only).state_dict()
    vecs = catalogue_embeddings(state, features, id_only)
    neighbours = content_neighbour_vectors(state["item_emb.weight"], features, id_only.new_item_neighbours)
    torch.testing.assert_close(vecs[ds.n_items :], neighbours)  # the configured count (default 100 of 190)
    # With one-hot "trained vectors", a new product's vector is its weights over the trained ones.
    weights = content_neighbour_vectors(torch.eye(ds.n_items), features)
    source = ds.items["item"].to_list().index(twin)
    twin_row = ds.new_items["item"].to_list().index("NEW-twin")
    assert int(weights[twin_row].argmax()) == source
    torch.testing.assert_close(weights.sum(1), torch.ones(len(weights)))


def test_export_serves_the_whole_catalogue(tmp_path, tiny_frames, shop_with_unsold):
    from typer.testing import CliRunner

    from fedrec.serving.export_store import load_export
    from fedrec.training.cli import app

    purchases, products = tiny_frames
    extra = products.head(3).with_columns(item=pl.format("UNSOLD-{}", pl.int_range(3)))
    csv = tmp_path / "purchases.csv"
    catalogue = tmp_path / "catalogue.csv"
    purchases.join(products, on="item").write_csv(csv)
    pl.concat([products, extra]).write_csv(catalogue)
    args = ["train", "--dataset", "file", "--set", f"data.path={csv}", "--set", f"data.catalogue_path={catalogue}"]
    for setting in (
        f"output.artifacts_dir={tmp_path / 'artifacts'}",
        "federation.rounds=2",
        "model.dim=8",
        "model.hash_buckets=512",
        "model.merchant_item_bias=true",
    ):
        args += ["--set", setting]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    export = load_export(tmp_path / "artifacts" / "file" / "exports" / "v0001")
    served = set(export.item_rows)
    assert {f"UNSOLD-{i}" for i in range(3)} <= served
    assert served == set(pl.concat([products, extra])["item"].to_list())
    card = export.card
    assert card["items"] == len(served) and "content tower" in card["new_items"]
    unsold = export.item_rows["UNSOLD-0"]
    for name in card["merchants"]:  # each shop's purchases and bias cover the new rows too (it loads)
        m = load_export(tmp_path / "artifacts" / "file" / "exports" / "v0001", merchant=name).merchant
        assert m.purchased.shape[1] == len(served)
        assert m.purchased[:, unsold].nnz == 0 and np.isfinite(m.item_bias[unsold])


def test_cold_start_split_holds_out_exactly_the_products_sold_only_in_test(tiny_dataset):
    known, new = cold_start_split(tiny_dataset)
    before = sum(np.asarray(m.full_train.sum(0)).ravel() for m in tiny_dataset.merchants)
    after = sum(np.asarray(m.test.sum(0)).ravel() for m in tiny_dataset.merchants)
    assert new.size > 0 and np.all(before[new] == 0) and np.all(after[new] > 0)
    assert known.n_items == tiny_dataset.n_items - new.size
    assert not set(known.items["item"]) & set(tiny_dataset.items["item"].to_numpy()[new])
    for m, k in zip(tiny_dataset.merchants, known.merchants, strict=True):
        assert k.train.nnz == m.train.nnz and k.val.nnz == m.val.nnz  # nothing known is lost
        assert k.test.nnz == m.test.nnz - m.test[:, new].nnz


def test_content_profile_ranks_by_shared_rare_tokens():
    pad = 9
    tokens = torch.tensor([[0, 1, pad], [2, 3, pad], [0, 4, pad], [2, 5, pad]])  # items 2, 3 are new
    bought = sp.csr_matrix(np.array([[1.0, 0.0], [0.0, 1.0]]))
    scores = content_profile_scores(bought, tokens, n_known=2, padding=pad)
    assert scores.shape == (2, 2)
    assert scores[0, 0] > scores[0, 1] and scores[1, 1] > scores[1, 0]


def test_recall_of_scores_by_hand():
    scores = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    truth = sp.csr_matrix(np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=np.float32))
    recall, users = recall_of_scores(scores, truth)
    assert users == 2 and recall == pytest.approx(1.0)  # 3 candidates: all in the top 20


def test_centralized_keeps_one_item_bias_per_merchant(tiny_dataset):
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    model = dataclasses.replace(MODEL, use_content=False, merchant_item_bias=True)
    central = dataclasses.replace(tiny_dataset, merchants=[pooled(tiny_dataset)])
    res = run_federated(central, features, model, LocalConfig(), FederationConfig(rounds=2, patience=0))
    bias = res.item_biases["pooled"]
    assert bias.shape == (len(tiny_dataset.merchants), tiny_dataset.n_items)
    assert (bias[0] - bias[1]).abs().max() > 1e-3  # the shops learned different popularities
    # the grouped scoring equals each merchant's own [u, 1] . [v, b]
    users, groups = res.user_embeddings["pooled"], central.merchants[0].user_groups
    items = torch.randn(tiny_dataset.n_items, users.shape[1])  # as wide as the users (a content block too)
    u, v = scoring_vectors(users, items, bias, groups)
    for g in range(bias.shape[0]):
        rows = np.flatnonzero(groups == g)[:3]
        ug, vg = scoring_vectors(users[rows], items, bias[g])
        torch.testing.assert_close(u[rows] @ v.T, ug @ vg.T)


@pytest.fixture
def id_only_shop(tiny_csv):
    """A small run config without a content tower on the tiny shop file, and its dataset."""
    from fedrec.training.data import load_dataset

    cfg = load_config(
        None,
        {"data.dataset": "file", "data.path": str(tiny_csv), "federation.rounds": 2, "model.dim": 8,
         "model.hash_buckets": 256, "model.use_content": False},
    )  # fmt: skip
    return cfg, load_dataset(cfg.data, 0)


def test_cold_start_section_in_evaluate(id_only_shop):
    from rich.console import Console

    from fedrec.training.cold_start import evaluate_cold_start

    cfg, ds = id_only_shop
    res = evaluate_cold_start(cfg, ds, (0, 1), Console(quiet=True))
    assert res["new_products"] > 0 and res["their_test_purchases"] >= res["customers"] > 0
    for name in ("federated", "federated_content_tower"):  # no content tower configured: both run
        assert len(res[name]["recall@20_per_seed"]) == 2 and 0 <= res[name]["recall@20"] <= 1
    assert 0 <= res["content_only"]["recall@20"] <= 1
    assert res["random_expectation"] == pytest.approx(min(20, res["new_products"]) / res["new_products"], abs=1e-4)


def test_content_neighbours_keep_only_the_most_similar_trained_products():
    pad = 9
    # trained 0-3, new 4: shares two tokens with item 0, one with item 1, one rare one with 2, none with 3
    tokens = torch.tensor([[0, 1, 2], [0, 3, pad], [4, 5, pad], [6, 7, pad], [0, 1, 4]])
    features = ItemFeatures(tokens=tokens, n_buckets=pad)
    every = content_neighbour_vectors(torch.eye(4), features)
    assert torch.equal(every, content_neighbour_vectors(torch.eye(4), features, 0))
    assert (every[0, :3] > 0).all() and every[0, 3] == 0
    for k in (1, 2):
        some = content_neighbour_vectors(torch.eye(4), features, k)
        kept = torch.argsort(every[0], descending=True)[:k]
        assert set(torch.nonzero(some[0]).ravel().tolist()) == set(kept.tolist())  # the k most similar
        torch.testing.assert_close(some[0, kept], every[0, kept] / every[0, kept].sum())  # same weights, renormed
    torch.testing.assert_close(content_neighbour_vectors(torch.eye(4), features, 10), every)  # k >= trained: all


def test_cold_start_split_on_validation_reads_no_test_purchase(tiny_dataset):
    known, new = cold_start_split(tiny_dataset, period="validation")
    train = sum(np.asarray(m.train.sum(0)).ravel() for m in tiny_dataset.merchants)
    val = sum(np.asarray(m.val.sum(0)).ravel() for m in tiny_dataset.merchants)
    assert new.size > 0 and np.all(train[new] == 0) and np.all(val[new] > 0)
    assert np.array_equal(new, np.flatnonzero((train == 0) & (val > 0)))
    # the same split whatever the test slice holds
    no_test = dataclasses.replace(
        tiny_dataset,
        merchants=[dataclasses.replace(m, test=sp.csr_matrix(m.test.shape)) for m in tiny_dataset.merchants],
    )
    known_again, new_again = cold_start_split(no_test, period="validation")
    assert np.array_equal(new_again, new) and known_again.items.equals(known.items)
    # the products known then are those bought in train: the ones sold only in test do not exist yet
    assert known.items["item"].to_list() == tiny_dataset.items["item"].to_numpy()[train > 0].tolist()
    assert (train + val == 0).any()  # the tiny shop has products sold only in test: they are left out
    with pytest.raises(ValueError, match="period"):
        cold_start_split(tiny_dataset, period="train")


def test_neighbour_counts_are_scored_on_validation(id_only_shop):
    from rich.console import Console

    from fedrec.training.cold_start import choose_neighbours_on_validation

    cfg, ds = id_only_shop
    res = choose_neighbours_on_validation(cfg, ds, (0,), Console(quiet=True), candidates=(0, 1))
    assert res["new_products"] > 0 and res["customers"] > 0
    assert set(res["recall_at_20"]) == {"0", "1"} and {res["best"], res["runner_up"]} == {0, 1}
    assert res["lead"] == pytest.approx(abs(res["recall_at_20"]["0"]["mean"] - res["recall_at_20"]["1"]["mean"]))
    assert all(0 <= v["mean"] <= 1 for v in res["recall_at_20"].values())
    with_tower = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, use_content=True))
    assert "recall_at_20" not in choose_neighbours_on_validation(with_tower, ds, (0,), Console(quiet=True))


def test_validate_cold_start_command_writes_its_file_or_refuses_a_content_tower(tiny_csv, tmp_path):
    import json

    from typer.testing import CliRunner

    from fedrec.training.cli import app

    base = ["validate-cold-start", "--dataset", "file", "--seeds", "1", "--set", f"data.path={tiny_csv}",
            "--set", f"output.results_dir={tmp_path}", "--set", "federation.rounds=2", "--set", "model.dim=8",
            "--set", "model.hash_buckets=256"]  # fmt: skip
    refused = CliRunner().invoke(app, [*base, "--set", "model.use_content=true"])
    assert refused.exit_code == 2 and "the content tower embeds new products" in refused.output
    assert "Traceback" not in refused.output and not list(tmp_path.glob("*.json"))
    ran = CliRunner().invoke(app, [*base, "--set", "model.use_content=false"])
    assert ran.exit_code == 0, ran.output
    (written,) = tmp_path.glob("validation-model.new_item_neighbours-*.json")
    res = json.loads(written.read_text())
    assert res["seeds"] == [0] and res["configured"] == 100 and "command" in res and "created" in res
