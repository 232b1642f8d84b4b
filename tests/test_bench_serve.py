"""The serving benchmark's machinery on a tiny export (the real run is `make bench-serve`)."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedrec.serving.bench import (
    BenchConfig,
    bench_catalogue,
    large_catalogue_vectors,
    markdown,
    merge_runs,
    soak,
    write_large_export,
)
from fedrec.serving.export_store import load_export
from fedrec.serving.index import search_depth

REQUIRED = {"endpoint", "catalogue_size", "concurrency", "rps", "p50_ms", "p95_ms", "p99_ms", "errors", "index",
            "http_5xx", "recall_at_10_vs_exact", "faiss_only_qps"}  # fmt: skip
WRK = pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")


def test_large_catalogue_keeps_the_real_vectors_first_and_is_seeded():
    base = np.random.default_rng(1).normal(size=(50, 8)).astype(np.float32)
    a, source = large_catalogue_vectors(base, 500, 0.5, seed=3)
    assert a.shape == (500, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a[:50], base)
    np.testing.assert_array_equal(source[:50], np.arange(50))
    copies = a[50:] / np.linalg.norm(a[50:], axis=1, keepdims=True)
    nearest = np.argmax(copies @ (base / np.linalg.norm(base, axis=1, keepdims=True)).T, axis=1)
    assert np.mean(nearest == source[50:]) > 0.8  # each copy stays near the row it copies
    np.testing.assert_array_equal(a, large_catalogue_vectors(base, 500, 0.5, seed=3)[0])
    assert not np.allclose(a, large_catalogue_vectors(base, 500, 0.5, seed=4)[0])


def test_gaussian_catalogue_has_the_base_mean_and_covariance():
    rng = np.random.default_rng(2)
    base = (rng.normal(size=(400, 4)) @ np.array([[2, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0.5, 0], [0, 0, 0, 1.0]])).astype(
        np.float32
    ) + 3.0
    a, _ = large_catalogue_vectors(base, 40_400, 0.5, seed=1, kind="gaussian")
    np.testing.assert_array_equal(a[:400], base)
    new = a[400:].astype(np.float64)
    np.testing.assert_allclose(new.mean(axis=0), base.mean(axis=0), atol=0.05)
    np.testing.assert_allclose(np.cov(new, rowvar=False), np.cov(base, rowvar=False), atol=0.08)
    with pytest.raises(ValueError, match="unknown catalogue kind"):
        large_catalogue_vectors(base, 500, 0.5, seed=1, kind="uniform")


@pytest.fixture
def tiny_bench(served_root, tmp_path):
    root = shutil.copytree(served_root, tmp_path / "artifacts")
    return BenchConfig(
        export=str(root / "exports"),
        merchant="big",
        large_items=3000,
        hnsw_m=16,
        ef_construction=40,
        ef_search=64,
        concurrencies=(1, 4),
        duration_s=1,
        workers=1,
        recall_queries=200,
        cache_dir=str(tmp_path / "bench"),
        results=str(tmp_path / "results" / "bench-serve.json"),
    )


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_large_export_is_a_valid_export_of_its_index_kind_and_is_cached(tiny_bench, kind):
    tiny_bench = replace(tiny_bench, large_index=kind)
    base = load_export(tiny_bench.export, "big")
    exports = write_large_export(base, tiny_bench)
    large = load_export(exports, "big")
    assert large.n_items == 3000 and large.kind == kind
    assert large.item_ids[: base.n_items] == base.item_ids
    assert large.merchant.purchased.shape == (len(base.merchant.user_ids), 3000)
    stamp = (exports / "v0001" / "index.faiss").stat().st_mtime_ns
    write_large_export(base, tiny_bench)
    assert (exports / "v0001" / "index.faiss").stat().st_mtime_ns == stamp


@WRK
def test_bench_drives_a_real_server_and_reports_every_field(tiny_bench):
    runs = bench_catalogue("tiny", Path(tiny_bench.export), tiny_bench, {"command": "test"})
    assert [r["concurrency"] for r in runs] == [1, 4]
    for r in runs:
        assert set(r) >= REQUIRED
        assert r["errors"] == 0 and r["requests"] > 10 and r["rps"] > 0
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["recall_at_10_vs_exact"] == 1.0  # a flat index is exact
    table = markdown(runs)
    assert table.count("| tiny |") == len(runs) and "GET /v1/merchants" in table
    json.dumps(runs)


@WRK
def test_bench_drives_the_basket_endpoint_without_errors(tiny_bench):
    runs = bench_catalogue("tiny", Path(tiny_bench.export), tiny_bench, {"command": "test"}, endpoint="basket")
    assert [r["endpoint"] for r in runs] == ["basket", "basket"]
    for r in runs:
        assert set(r) >= REQUIRED
        assert r["errors"] == 0 and r["http_5xx"] == 0 and r["requests"] > 10
        assert r["recall_at_10_vs_exact"] is None  # not a customer-vector measurement
    assert "POST /v1/recommendations" in markdown(runs)


@WRK
def test_soak_variant_reloads_mid_load_without_a_failed_request(tiny_bench):
    """The 20-second CI variant of the 5-minute soak: mixed load, bad requests, a hot reload."""
    cfg = BenchConfig(**{**tiny_bench.__dict__, "soak_s": 20, "soak_warmup_s": 2})
    row = soak(cfg, {"command": "test", "load_generator": "wrk"})
    assert row["endpoint"] == "mixed" and row["requests"] > 100
    assert row["http_5xx"] == 0 and row["socket_errors"] == 0
    assert row["bad_requests_sent"] >= row["requests"] // 60  # every 50th request is a bad one
    # every bad request got its 4xx and nothing else did (a few may be in flight when wrk stops)
    assert abs(row["http_4xx"] - row["bad_requests_sent"]) <= 16
    assert row["http_2xx"] + row["http_4xx"] <= row["requests"]
    assert row["reload"]["from"] == "v0002" and row["reload"]["to"] == "v0003"
    assert row["reload"]["served_after"] == ["v0003"]
    assert row["rss_start_mb"] > 0 and row["rss_end_mb"] > 0
    assert "Soak" in markdown([row])
    assert (Path(tiny_bench.export) / "LATEST").read_text().strip() == "v0002"  # the soak works on a copy


def test_a_partial_run_replaces_only_the_rows_it_measures():
    old = [
        {"catalogue": "a", "concurrency": 1, "rps": 1.0},  # written before rows had an endpoint
        {"endpoint": "GET /v1/merchants/{merchant}/customers/{customer}/recommendations?k=10", "catalogue": "b",
         "concurrency": 1, "rps": 0.5},  # written when `endpoint` held the request line
        {"endpoint": "basket", "catalogue": "a", "concurrency": 1, "rps": 2.0},
    ]  # fmt: skip
    new = [{"endpoint": "basket", "catalogue": "a", "concurrency": 1, "rps": 3.0}]
    merged = merge_runs(old, new)
    assert {(r["endpoint"], r["rps"]) for r in merged} == {("customer", 1.0), ("customer", 0.5), ("basket", 3.0)}
    assert next(r for r in merged if r["rps"] == 0.5)["request"].startswith("GET /v1/merchants")


@pytest.mark.parametrize(
    ("kind", "knob"), [("hnsw", {"ef_search": 200}), ("ivf", {"nprobe": 7}), ("ivfpq", {"nprobe": 3})]
)
def test_search_depth_setting_reaches_the_shared_and_the_merchant_bias_index(tiny_bench, kind, knob):
    """A large catalogue with a merchant bias: both indexes honour --ef-search / --nprobe, and the
    scores are the exact u . v + b of the rows returned."""
    from fedrec.serving.recommend import search
    from fedrec.serving.settings import ServeSettings
    from fedrec.serving.state import ExportHolder

    tiny_bench = replace(tiny_bench, large_index=kind)
    base = load_export(tiny_bench.export, "big")
    exports = write_large_export(base, tiny_bench)
    mdir = exports.parent / "merchants" / "big" / "v0001"
    bias = np.random.default_rng(0).normal(size=3000).astype(np.float32)
    np.save(mdir / "item_bias.npy", bias)
    holder = ExportHolder(ServeSettings(export=str(exports), merchant="big", watch_interval=0, **knob))
    assert holder.reload(False).error is None
    export = holder.current
    assert export.kind == kind and export.merchant.index is not None
    for index in (export.index, export.merchant.index):
        assert search_depth(index) == knob
    u = export.merchant.user_vectors[0]
    rows, scores = search(export, u, 5, popularity_weight=1.0)
    exact = export.item_vectors @ u + bias
    np.testing.assert_allclose(scores, exact[rows], rtol=1e-4, atol=1e-4)
    assert len(set(rows) & set(np.argsort(-exact)[:5])) >= 4  # near-exact on a tiny catalogue


def test_similar_items_without_a_cosine_index_are_by_inner_product_because_reranking_misses(tiny_bench):
    """An HNSW export without cosine.faiss (this benchmark's large exports; exports made before it)
    ranks similar items by inner product; and why exports now carry that second index: re-ranking
    the inner-product graph's candidates by cosine finds few of the true cosine neighbours."""
    from fedrec.serving.recommend import search, similar_items

    tiny_bench = replace(tiny_bench, large_index="hnsw")
    base = load_export(tiny_bench.export, "big")
    large = load_export(write_large_export(base, tiny_bench), "big")
    assert large.kind == "hnsw" and large.cosine_index is None
    assert large.similar_items_rule.startswith("inner product")
    unit = large.unit_vectors
    overlaps = []
    for row in (0, 7, 100, 2500):
        rows, scores = similar_items(large, row, 10)
        ip_rows, ip_scores = search(large, large.item_vectors[row], 10, np.array([row]))
        assert list(rows) == list(ip_rows) and row not in rows
        candidates, _ = search(large, large.item_vectors[row], 200, np.array([row]))
        reranked = candidates[np.argsort(-(unit[candidates] @ unit[row]))[:10]]
        exact = unit @ unit[row]
        exact[row] = -np.inf
        overlaps.append(len(set(reranked) & set(np.argsort(-exact)[:10])) / 10)
    assert np.mean(overlaps) < 0.6
