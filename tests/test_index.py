"""Serving indexes: the MIPS-to-L2 IVF returns exact inner-product top-k when it scans every list,
keeps its scores as inner products, and survives a save and load; IVF-PQ fast-scan ("ivfpq") does
the same through its exact re-ranking, which its 4-bit codes alone do not."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from fedrec.serving.index import (
    IndexParams,
    MipsIndex,
    build_index,
    choose_kind,
    index_kind,
    ivf_lists,
    ivfpq_lists,
    load_index,
    save_index,
    search_depth,
    set_search_depth,
)


@pytest.fixture(scope="module")
def catalogue() -> tuple[np.ndarray, np.ndarray]:
    """Vectors whose norms differ by 10x (where inner product and L2 rankings disagree)."""
    rng = np.random.default_rng(0)
    items = rng.standard_normal((4000, 16)).astype(np.float32) * rng.uniform(0.2, 2.0, (4000, 1)).astype(np.float32)
    queries = rng.standard_normal((50, 16)).astype(np.float32)
    return items, queries


def exact_top(items: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ items.T
    rows = np.argsort(-scores, axis=1)[:, :k]
    return rows, np.take_along_axis(scores, rows, axis=1)


def test_ivf_scanning_every_list_is_exact_inner_product(catalogue) -> None:
    items, queries = catalogue
    index = build_index(items, "ivf")
    assert isinstance(index, MipsIndex) and index_kind(index) == "ivf"
    assert index.d == 16 and index.ntotal == 4000 and index.metric_type == faiss.METRIC_INNER_PRODUCT
    set_search_depth(index, nprobe=ivf_lists(4000))
    scores, rows = index.search(queries, 10)
    truth, truth_scores = exact_top(items, queries, 10)
    np.testing.assert_array_equal(rows, truth)
    np.testing.assert_allclose(scores, truth_scores, atol=1e-4)


def test_l2_on_raw_vectors_would_rank_differently(catalogue) -> None:
    """The extra dimension is what makes L2 rank by inner product: plain L2 neighbours differ."""
    items, queries = catalogue
    plain = faiss.IndexFlatL2(16)
    plain.add(items)
    _, rows = plain.search(queries, 10)
    truth, _ = exact_top(items, queries, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth, strict=True)])
    assert overlap < 0.5


def test_saved_ivf_loads_back_as_the_same_inner_product_index(catalogue, tmp_path) -> None:
    items, queries = catalogue
    index = build_index(items, "ivf", IndexParams(nprobe=8))
    save_index(index, tmp_path / "index.faiss")
    back = load_index(tmp_path / "index.faiss")
    assert isinstance(back, MipsIndex) and index_kind(back) == "ivf"
    assert back.max_norm == pytest.approx(index.max_norm, rel=1e-5)
    assert search_depth(back) == {"nprobe": 8}
    a, ra = index.search(queries, 10)
    b, rb = back.search(queries, 10)
    np.testing.assert_array_equal(ra, rb)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_a_plain_l2_index_is_refused_not_misread(catalogue, tmp_path) -> None:
    """Only the reduction's rows all have norm M; another L2 index would give wrong inner products."""
    items, _ = catalogue
    plain = faiss.IndexIDMap2(faiss.IndexFlatL2(17))
    plain.add_with_ids(np.hstack([items, items[:, :1]]), np.arange(len(items), dtype=np.int64))
    faiss.write_index(plain, str(tmp_path / "plain.faiss"))
    with pytest.raises(ValueError, match="not the MIPS reduction"):
        load_index(tmp_path / "plain.faiss")


def test_auto_picks_ivfpq_for_large_catalogues_others_on_request_and_refuses_unknown_kinds() -> None:
    assert choose_kind(99_999) == "flat" and choose_kind(100_000) == "ivfpq"
    assert choose_kind(10, "ivf") == "ivf" and choose_kind(10, "hnsw") == "hnsw"
    assert ivf_lists(1_000_000) == 4096 and ivf_lists(100_000) == 1024
    assert ivfpq_lists(1_000_000) == 256 and choose_kind(10, "ivfpq") == "ivfpq"
    with pytest.raises(ValueError, match="unknown index type 'lsh'"):
        choose_kind(10, "lsh")


def test_mips_scores_hold_for_short_long_and_zero_queries(catalogue) -> None:
    """Queries are rescaled to the items' maximal norm inside the search; the scores returned are
    still the inner products with the query as given (and a zero query scores 0)."""
    items, queries = catalogue
    index = build_index(items, "ivf")
    set_search_depth(index, nprobe=ivf_lists(4000))
    for factor in (1e-3, 1.0, 50.0):
        scores, rows = index.search(queries * factor, 10)
        truth, truth_scores = exact_top(items, queries * factor, 10)
        np.testing.assert_array_equal(rows, truth)
        np.testing.assert_allclose(scores, truth_scores, rtol=1e-3, atol=1e-4)
    zero_scores, zero_rows = index.search(np.zeros((1, 16), dtype=np.float32), 5)
    assert (zero_rows >= 0).all()
    np.testing.assert_allclose(zero_scores, 0.0, atol=1e-4)


@pytest.mark.parametrize("width", [16, 17])
def test_ivfpq_scanning_every_list_is_exact_inner_product_after_reranking(catalogue, width, tmp_path) -> None:
    """17 columns (a merchant's [v, b]) are padded to 18 inside the index: same answers, same scores,
    before and after a save and load."""
    items, queries = catalogue
    items = np.hstack([items, items[:, :1] * 0.5])[:, :width]
    queries = np.hstack([queries, np.ones((len(queries), 1), dtype=np.float32)])[:, :width]
    index = build_index(items, "ivfpq", IndexParams(k_factor=100))
    assert index_kind(index) == "ivfpq" and search_depth(index) == {"nprobe": ivfpq_lists(4000) // 2}
    assert index.d == width and index.ntotal == 4000 and index.metric_type == faiss.METRIC_INNER_PRODUCT
    set_search_depth(index, nprobe=ivfpq_lists(4000))
    truth, truth_scores = exact_top(items, queries, 10)
    save_index(index, tmp_path / "index.faiss")
    back = load_index(tmp_path / "index.faiss")
    assert index_kind(back) == "ivfpq" and search_depth(back) == {"nprobe": ivfpq_lists(4000)}
    for searched in (index, back):
        scores, rows = searched.search(queries, 10)
        np.testing.assert_array_equal(rows, truth)
        np.testing.assert_allclose(scores, truth_scores, atol=1e-4)


def test_ivfpq_codes_alone_miss_part_of_the_top_10(catalogue) -> None:
    """Without the re-ranking (k_factor 1) the 4-bit codes' order is not the exact one."""
    items, queries = catalogue
    index = build_index(items, "ivfpq", IndexParams(k_factor=1))
    set_search_depth(index, nprobe=ivfpq_lists(4000))
    _, rows = index.search(queries, 10)
    truth, _ = exact_top(items, queries, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth, strict=True)])
    assert overlap < 0.95


def test_ivfpq_caps_the_candidates_reranked_for_a_large_k(catalogue, monkeypatch) -> None:
    """k_factor x k candidates, but at most MAX_RERANKED: with the cap at k the search returns the
    codes' own order (what k_factor 1 gives); under the cap, the full re-ranking."""
    import fedrec.serving.index as index_module

    items, queries = catalogue
    reranked = build_index(items, "ivfpq", IndexParams(k_factor=100))
    codes_only = build_index(items, "ivfpq", IndexParams(k_factor=1))
    for index in (reranked, codes_only):
        set_search_depth(index, nprobe=ivfpq_lists(4000))
    truth, _ = exact_top(items, queries, 10)
    _, rows = index_module.search_index(reranked, queries, 10)
    np.testing.assert_array_equal(rows, truth)
    monkeypatch.setattr(index_module, "MAX_RERANKED", 10)
    _, capped = index_module.search_index(reranked, queries, 10)
    np.testing.assert_array_equal(capped, codes_only.search(queries, 10)[1])
    assert not np.array_equal(capped, truth)


def test_rerank_depth_grows_with_the_results_kept_not_with_the_exclusions(monkeypatch) -> None:
    """64 per result kept plus one per excluded row: a customer with 8 purchases asks for 18 and
    gets 648 candidates, not 64 x 18; a basket's 1,000 nearest stop at the cap; never under k."""
    import fedrec.serving.index as index_module
    from fedrec.serving.index import MAX_RERANKED, rerank_depth

    assert rerank_depth(64, 10, 10) == 640
    assert rerank_depth(64, 18, 10) == 648
    assert rerank_depth(64, 1000, 1000) == MAX_RERANKED
    assert rerank_depth(64, 3000, 3000) == 3000
    assert rerank_depth(1, 20, 10) == 20
    monkeypatch.setattr(index_module, "MAX_RERANKED", 100)
    assert rerank_depth(64, 10, 10) == 100


def test_ivfpq_search_keeps_the_served_depth_when_excluded_rows_are_over_fetched(catalogue) -> None:
    """Asking for 10 + 10 with kept=10 re-ranks k_factor x 10 + 10: with k_factor 1 that is the
    codes' own first 20, so the top-10 is the codes' order; k=20 without `kept` re-ranks 20 too."""
    import fedrec.serving.index as index_module

    items, queries = catalogue
    codes_only = build_index(items, "ivfpq", IndexParams(k_factor=1))
    deep = build_index(items, "ivfpq", IndexParams(k_factor=4))
    for index in (codes_only, deep):
        set_search_depth(index, nprobe=ivfpq_lists(4000))
    _, shallow = index_module.search_index(deep, queries, 20, kept=10)  # 4 x 10 + 10 = 50 re-ranked
    _, wide = index_module.search_index(deep, queries, 20)  # 4 x 20 = 80 re-ranked
    _, codes = codes_only.search(queries, 50)
    exact_50 = [set(r) for r in codes]  # the 50 candidates the shallow search re-ranked
    assert all(set(row) <= cand for row, cand in zip(shallow, exact_50, strict=True))
    assert not all(set(row) <= cand for row, cand in zip(wide, exact_50, strict=True))
