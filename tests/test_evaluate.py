"""`fedrec evaluate`'s comparison code: the wiring of every method, seeds, and EASE on validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.baselines import ALS_GRID, KNN_GRID, ease_weights, item_knn
from fedrec.config import load_config
from fedrec.training.evaluate import (
    METHODS,
    TRAINED,
    _split_rows,
    choose_als_settings,
    choose_ease_lambda,
    choose_knn_settings,
    evaluate,
    markdown_table,
    one_label_baskets,
)


def test_pooled_rows_go_back_to_their_own_merchants(tiny_dataset):
    total = sum(m.n_users for m in tiny_dataset.merchants)
    vecs = torch.arange(total, dtype=torch.float32)[:, None]
    parts = _split_rows(tiny_dataset, vecs)
    start = 0
    for m in tiny_dataset.merchants:
        assert parts[m.name].shape == (m.n_users, 1)
        assert parts[m.name][0, 0].item() == start  # pooled() stacks merchants in dataset order
        start += m.n_users


def test_ease_is_the_constrained_ridge_regression_of_each_item_on_the_others():
    rng = np.random.default_rng(0)
    x = sp.csr_matrix((rng.random((40, 6)) < 0.3).astype(np.float32))
    lam = 3.0
    b = ease_weights(x, lam)
    dense = x.toarray().astype(np.float64)
    assert np.allclose(np.diag(b), 0.0)
    for j in range(6):
        others = [i for i in range(6) if i != j]
        xo = dense[:, others]
        expected = np.linalg.solve(xo.T @ xo + lam * np.eye(5), xo.T @ dense[:, j])
        np.testing.assert_allclose(b[others, j], expected, rtol=1e-6, atol=1e-8)


def test_ease_lambda_is_chosen_on_validation_and_ignores_test(tiny_dataset):
    lam, scores = choose_ease_lambda(tiny_dataset, (1.0, 10.0, 100.0))
    assert lam == max((1.0, 10.0, 100.0), key=lambda v: scores[str(v)])
    scrambled = dataclasses.replace(
        tiny_dataset,
        merchants=[dataclasses.replace(m, test=sp.csr_matrix(m.test.shape, dtype=m.test.dtype))
                   for m in tiny_dataset.merchants],
    )  # fmt: skip
    assert choose_ease_lambda(scrambled, (1.0, 10.0, 100.0)) == (lam, scores)


def test_als_settings_are_chosen_on_validation_and_ignore_test(tiny_dataset):
    grid = {"factors": (2, 8), "regularization": (0.1,), "alpha": (1.0, 20.0)}
    settings, scores = choose_als_settings(tiny_dataset, (0, 1), grid)
    assert len(scores) == 4 and len(set(scores.values())) > 1  # the grid's settings really differ
    chosen = ",".join(f"{k}={v:g}" for k, v in settings.items())
    assert scores[chosen] == max(scores.values())
    scrambled = dataclasses.replace(
        tiny_dataset,
        merchants=[dataclasses.replace(m, test=sp.csr_matrix(m.test.shape, dtype=m.test.dtype))
                   for m in tiny_dataset.merchants],
    )  # fmt: skip
    assert choose_als_settings(scrambled, (0, 1), grid) == (settings, scores)


@pytest.mark.filterwarnings("ignore:Method expects CSR input")
@pytest.mark.parametrize("similarity", ["cosine", "bm25", "tfidf"])
def test_item_knn_ranks_as_implicits_own_recommend(similarity):
    """X S as (users, items) must give implicit's scores: with 3 neighbours kept per product the
    similarity is not symmetric, so scoring with S instead of S' would fail here."""
    from implicit.nearest_neighbours import BM25Recommender, CosineRecommender, TFIDFRecommender

    rng = np.random.default_rng(1)
    x = sp.csr_matrix((rng.random((30, 12)) < 0.3).astype(np.float32))
    users, items, sim = item_knn(x, similarity, 3)
    assert sim.shape == (12, 12) and (np.count_nonzero(sim, axis=1) <= 3).all()
    assert not np.allclose(sim, sim.T)  # the pruning made it asymmetric: the check below can tell S from S'
    ours = (users @ items.T).numpy()
    model = {"cosine": CosineRecommender, "bm25": BM25Recommender, "tfidf": TFIDFRecommender}[similarity](K=3)
    model.fit(x, show_progress=False)
    for u in range(30):
        ids, scores = model.recommend(u, x[u], N=12, filter_already_liked_items=False)
        np.testing.assert_allclose(ours[u, ids], scores, rtol=1e-5, atol=1e-6)


def test_item_knn_settings_are_chosen_on_validation_and_ignore_test(tiny_dataset):
    grid = {"similarity": ("cosine", "bm25"), "neighbours": (2, 50)}
    settings, scores = choose_knn_settings(tiny_dataset, grid)
    assert len(scores) == 4 and len(set(scores.values())) > 1  # the grid's settings really differ
    assert scores[f"{settings['similarity']},neighbours={settings['neighbours']}"] == max(scores.values())
    scrambled = dataclasses.replace(
        tiny_dataset,
        merchants=[dataclasses.replace(m, test=sp.csr_matrix(m.test.shape, dtype=m.test.dtype))
                   for m in tiny_dataset.merchants],
    )  # fmt: skip
    assert choose_knn_settings(scrambled, grid) == (settings, scores)
    with pytest.raises(ValueError, match="item-kNN similarity 'jaccard'"):
        item_knn(tiny_dataset.merchants[0].train, "jaccard", 10)


def test_a_large_catalogue_skips_the_item_item_references_and_scores_similar_items_in_blocks(tiny_dataset, monkeypatch):
    """Above the limits (lowered here), EASE and item-kNN are skipped with the reason, the tables
    leave them out, and the similar-items rates are the dense path's numbers made in row blocks."""
    from rich.console import Console

    from fedrec.training import evaluate as ev

    cfg = load_config(None, {"data.dataset": "synthetic"})
    labels = ev.item_labels(tiny_dataset.items)
    rng = np.random.default_rng(0)
    items = torch.from_numpy(rng.normal(size=(tiny_dataset.n_items, 8)).astype(np.float32))
    users = {m.name: torch.from_numpy(rng.normal(size=(m.n_users, 8)).astype(np.float32))
             for m in tiny_dataset.merchants}  # fmt: skip
    biases = {m.name: None for m in tiny_dataset.merchants}
    dense = ev.diversity(tiny_dataset, users, items, biases, labels)
    monkeypatch.setattr(ev, "DENSE_SIMILARITY_MAX_ITEMS", 3)
    assert ev.diversity(tiny_dataset, users, items, biases, labels) == dense
    customers = sum(m.n_users for m in tiny_dataset.merchants)
    assert customers > tiny_dataset.n_items  # so the second limit below is passed by customers alone
    # ALS's 96-setting search is not what this checks: one setting, as if validation had chosen it
    monkeypatch.setattr(ev, "choose_als_settings", lambda *_: ({"factors": 4, "regularization": 0.1, "alpha": 5.0}, {}))
    for limit in (3, tiny_dataset.n_items):  # too many products; then too many customer-product pairs
        monkeypatch.setattr(ev, "ITEM_ITEM_MAX_ITEMS", limit)
        refs = ev.references(tiny_dataset, (0,), ev.make_scorer(tiny_dataset, cfg), Console(quiet=True))
        for name in ("ease", "item_knn"):
            assert refs[name] == {"skipped": refs["ease"]["skipped"]} and "items x items" in refs[name]["skipped"]
        assert f"{customers} customers" in refs["ease"]["skipped"]
        assert "overall" in refs["popularity"] and "overall" in refs["implicit_als"]


def test_every_method_is_scored_on_the_same_customers_with_seeds_for_trained_ones(tiny_csv, tmp_path):
    cfg = load_config(
        None,
        {
            "data.dataset": "file",
            "data.path": str(tiny_csv),
            "federation.rounds": 2,
            "model.dim": 8,
            "model.hash_buckets": 256,
            "model.merchant_item_bias": True,
        },
    )
    from rich.console import Console

    res = evaluate(cfg, Console(quiet=True), quiet_rounds=True, seeds=(0, 1))
    for name in METHODS:
        # one exclusion rule and one population: every method is ranked for the same customers
        assert res[name]["users"] == res["popularity"]["users"]
        assert {n: v["users"] for n, v in res[name]["per_merchant"].items()} == {
            n: v["users"] for n, v in res["popularity"]["per_merchant"].items()
        }
    for name in TRAINED:
        per_seed = res[name]["recall@20_per_seed"]
        assert res[name]["seeds"] == [0, 1] and len(per_seed) == 2
        assert abs(res[name]["overall"]["recall@20"] - np.mean(per_seed)) < 1e-4
        assert abs(res[name]["recall@20_std"] - np.std(per_seed, ddof=1)) < 1e-4
    assert res["federated"]["recall@20_per_seed"][0] != res["federated"]["recall@20_per_seed"][1]  # seeds differ
    assert "seeds" not in res["popularity"] and res["ease"]["settings"]["chosen_on"] == "validation recall@20"
    als = res["implicit_als"]["settings"]
    assert len(als["validation"]) == np.prod([len(v) for v in ALS_GRID.values()]) and als["validation"][
        f"factors={als['factors']},regularization={als['regularization']:g},alpha={als['alpha']:g}"
    ] == max(als["validation"].values())
    assert set(res["ablations"]) == {
        "aggregation=fedavg", "normalize_steps=False", "merchant_item_bias=False", "refit=False"
    }  # fmt: skip
    # with a merchant item bias, the trained methods are scored at each merchant's served weight,
    # and beside it at the trained score: the same number the popularity-weight curve gives at w = 1
    merchants = set(res["popularity"]["per_merchant"])
    for name in ("federated", "centralized"):
        assert [set(seed) for seed in res[name]["served_weights_per_seed"]] == [merchants, merchants]
        assert all(
            w in cfg.model.served_popularity_weights for s in res[name]["served_weights_per_seed"] for w in s.values()
        )
    at_one = res["federated"]["popularity_weight"]["test"]["1"]
    assert res["federated"]["trained_score"]["recall@20"] == pytest.approx(at_one["recall@20"])
    assert res["federated"]["trained_score"]["top1_share"] == pytest.approx(at_one["top1_share"])
    # the released federated and centralized models are the refits (on train + validation)
    for name in ("federated", "centralized"):
        assert res[name]["refit_rounds"] == res[name]["best_round"] >= 1
    assert res["ablations"]["refit=False"]["recall@20_per_seed"] != res["federated"]["recall@20_per_seed"]
    for name in METHODS:
        div = res[name]["diversity"]
        assert 0 < div["coverage@10"] <= 1 and 0 < div["top1_share"] <= 1
    assert "similar_same_label@10_cosine" in res["federated"]["diversity"]  # the tiny shop has categories
    assert "similar_same_label@10_ip" not in res["popularity"]["diversity"]  # no item-item meaning there
    knn = res["item_knn"]["settings"]
    assert len(knn["validation"]) == np.prod([len(v) for v in KNN_GRID.values()])
    assert knn["validation"][f"{knn['similarity']},neighbours={knn['neighbours']}"] == max(knn["validation"].values())
    for name in ("federated", "centralized", "implicit_als", "ease", "item_knn"):  # each folds in the same baskets
        assert 0 <= res[name]["diversity"]["basket_same_label@10"] <= 1
    assert "basket_same_label@10" not in res["popularity"]["diversity"]
    table = markdown_table(res)
    assert "| item_knn |" in table and "item-kNN: " in table
    assert "| ease |" in table and "±" in table and "seeds 0, 1" in table and "implicit ALS: " in table
    assert "Served popularity weights" in table and "| centralized |" in table
    # a catalogue above ITEM_ITEM_MAX_ITEMS: the tables leave the skipped references out and say why
    skipped = {**res, "ease": {"skipped": "skipped: too large"}, "item_knn": {"skipped": "skipped: too large"}}
    table = markdown_table(skipped)
    assert "| ease |" not in table and "| item_knn |" not in table and "EASE (skipped: too large)" in table
    # Rerunning the cold-start section alone keeps every other section of the file as it was.
    import json

    from fedrec.errors import FedrecError
    from fedrec.training.evaluate import rerun_cold_start, rerun_references, write_results

    out = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, results_dir=str(tmp_path)))
    with pytest.raises(FedrecError, match="no results file to update"):
        rerun_cold_start(out, Console(quiet=True), (0,))
    write_results(res, tmp_path)
    paths = rerun_cold_start(out, Console(quiet=True), (0,))
    again = json.loads(paths["json"].read_text())
    assert again["cold_start"]["federated"]["seeds"] == [0] and res["cold_start"]["federated"]["seeds"] == [0, 1]
    assert again["cold_start"]["command"].endswith("--only-cold-start")  # a file dataset: the CLI flag
    assert again["federated"] == json.loads(json.dumps(res["federated"])) and again["command"] == res["command"]
    # ... and so does rerunning the references alone (ALS's settings chosen on validation again).
    paths = rerun_references(out, Console(quiet=True), (0,))
    refs = json.loads(paths["json"].read_text())
    assert refs["implicit_als"]["seeds"] == [0] and res["implicit_als"]["seeds"] == [0, 1]
    assert refs["implicit_als"]["settings"]["chosen_on"].startswith("validation recall@20")
    assert refs["references_rerun"]["command"].endswith("--only-references")
    assert refs["cold_start"] == again["cold_start"] and refs["federated"] == again["federated"]


def test_one_category_baskets_take_the_most_bought_single_label_products():
    labels = np.zeros((14, 3))
    labels[:12, 0] = 1  # label 0: items 0-11, of which 10 and 11 also carry label 1
    labels[10:12, 1] = 1
    labels[12:, 2] = 1  # label 2: too few products for a basket
    counts = np.arange(14, dtype=float)  # later items are bought more
    baskets, which = one_label_baskets(labels, counts)
    assert which.tolist() == [0]
    assert sorted(baskets[0].tolist()) == [5, 6, 7, 8, 9]  # 10 and 11 are not label 0 alone


def test_popularity_weight_curve_scales_the_merchant_bias_on_validation_and_test(tiny_dataset):
    from fedrec.evaluation import combine_sums, evaluate_test_all, evaluate_val, popularity_weight_curve

    rng = torch.Generator().manual_seed(0)
    items = torch.randn(tiny_dataset.n_items, 4, generator=rng)
    users = {m.name: torch.randn(m.n_users, 4, generator=rng) for m in tiny_dataset.merchants}
    biases = {m.name: 3 * torch.randn(tiny_dataset.n_items, generator=rng) for m in tiny_dataset.merchants}
    curve = popularity_weight_curve(tiny_dataset.merchants, users, items, biases, "test", (0.0, 1.0))
    full = evaluate_test_all(tiny_dataset.merchants, users, items, biases)["overall"]["recall@20"]
    none = evaluate_test_all(tiny_dataset.merchants, users, items)["overall"]["recall@20"]
    assert full != none  # the bias matters in this model, so the two ends must differ
    assert abs(curve["1"]["recall@20"] - full) < 1e-9 and abs(curve["0"]["recall@20"] - none) < 1e-9
    val = popularity_weight_curve(tiny_dataset.merchants, users, items, biases, "val", (0.5,))["0.5"]
    half = {name: 0.5 * b for name, b in biases.items()}
    sums = combine_sums([evaluate_val(m, users[m.name], items, half[m.name]) for m in tiny_dataset.merchants])
    assert abs(val["recall@20"] - sums.means()["recall@20"]) < 1e-9
    assert 0 < val["top1_share"] <= 1 and 0 < val["coverage@10"] <= 1
    with pytest.raises(ValueError, match="split"):
        popularity_weight_curve(tiny_dataset.merchants, users, items, biases, "train")
