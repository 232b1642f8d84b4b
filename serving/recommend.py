"""Ranking over one loaded export: the serving path from a query vector to top-k catalogue rows.

Functions take the `LoadedExport` a request picked up, never the app's current one, so a request
that started before a reload finishes on the version it started with.
"""

from __future__ import annotations

import zlib

import numpy as np
import scipy.sparse as sp

from fedrec.content_profiles import fold_in_with_match
from fedrec.serving.export_store import LoadedExport
from fedrec.serving.foldin import FoldInConfig, fold_in_ials, fold_in_many, fold_in_sampled
from fedrec.serving.index import search_index, unit_rows


def served_index(export: LoadedExport, queries: np.ndarray, popularity_weight: float | np.ndarray | None = 1.0):
    """The index and query vectors for a search: with a merchant item bias, its own [v, b] index
    queried with [u, w], so the score is u . v + w b. w = 1 is the trained score; a smaller w
    damps the shop's popularity term (measured trade-off in the README's Results); None, or a
    merchant without a bias, searches the shared index with u alone."""
    merchant = export.merchant
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if popularity_weight is not None and merchant is not None and merchant.index is not None:
        w = np.broadcast_to(np.asarray(popularity_weight, dtype=np.float32), (queries.shape[0],))
        return merchant.index, np.ascontiguousarray(np.hstack([queries, w[:, None]]))
    return export.index, queries


def search_many(
    export: LoadedExport,
    queries: np.ndarray,
    ks: list[int],
    excludes: list[np.ndarray | None],
    popularity_weight: float | np.ndarray | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Top-k rows and scores for each query vector (one FAISS call for the batch), each with its
    `exclude` rows removed.

    Over-fetches by the number of excluded rows so that k results remain whenever the
    catalogue has them (HNSW widens its search to at least the number asked for; IVF pads
    with -1 when its probed lists hold fewer, about 7,800 candidates at 1M and nprobe 32).
    popularity_weight: score u . v + w b with this merchant's item bias b when it has one, one w
    for all queries or one per query (customer and basket recommendations); None: u . v.
    """
    index, vectors = served_index(export, queries, popularity_weight)
    want = min(max(k + (0 if ex is None else len(ex)) for k, ex in zip(ks, excludes, strict=True)), export.n_items)
    if export.kind == "flat" and export.copurchase[1]:
        scores, rows = exact_top(export, vectors, want)
    else:
        scores, rows = search_index(index, vectors, want, kept=max(ks))
    out = []
    for r, s, k, ex in zip(rows, scores, ks, excludes, strict=True):
        keep = r >= 0
        if ex is not None and len(ex):
            keep &= ~np.isin(r, ex)
        out.append((r[keep][:k], s[keep][:k]))
    return out


def exact_top(export: LoadedExport, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The flat index's answer (scores, rows: the k best of every product) for a model with the
    co-purchase term, with its block scored sparsely.

    Why: the block is a catalogue wide (`fedrec/copurchase.py`), and a query's part of it is its
    purchase row, mostly zeros, so a dense search reads catalogue x catalogue numbers per query
    (9,000 products: 35 ms in FAISS) where the rows of B for what was bought are enough.
    `vectors` as `served_index` gives them: with a merchant's bias, [u, w] against [v, b].
    """
    dense = export.dim - export.copurchase[1]
    scores = vectors[:, :dense] @ export.item_vectors[:, :dense].T
    if vectors.shape[1] > export.dim:  # the merchant's w times its item bias
        scores += vectors[:, export.dim :] * export.merchant.item_bias[None, :]
    scores += sp.csr_matrix(vectors[:, dense : export.dim]) @ export.copurchase_rows
    rows, best = top_k(scores, k)
    return best.astype(np.float32), rows.astype(np.int64)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows of each query's k highest scores (`scores`: queries x products, 1 <= k <= products),
    best first, and those scores: a partial sort, not a sort of the whole catalogue."""
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    rows = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1, kind="stable"), 1)
    return rows, np.take_along_axis(scores, rows, 1)


def search(
    export: LoadedExport,
    query: np.ndarray,
    k: int,
    exclude: np.ndarray | None = None,
    popularity_weight: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows and scores for one query vector (see `search_many`)."""
    return search_many(export, np.reshape(query, (1, -1)), [k], [exclude], popularity_weight)[0]


def similar_items(export: LoadedExport, row: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k items most similar to one item (the item left out), by cosine of the item vectors:
    exactly on a flat catalogue, through the export's second index of unit-length vectors on an
    approximate (ivfpq, IVF or HNSW) one; by inner product on an approximate export that predates it.

    Why cosine: raw inner product favours items with long vectors (the popular ones). Measured by
    `make evaluate` (share of the 10 nearest items that share a category or genre), cosine beat
    inner product for our model on both datasets (results/evaluation-*.json, `diversity`).
    Why a second index: re-ranking the inner-product index's candidates by cosine found few of the
    true cosine neighbours on HNSW (a test shows it).
    """
    if export.kind != "flat":
        if export.cosine_index is None:
            return search(export, export.item_vectors[row], k, np.array([row]))
        query = unit_rows(export.item_vectors[row : row + 1])
        k = min(k, export.n_items - 1)
        scores, rows = search_index(export.cosine_index, query, k + 1, kept=k)
        keep = (rows[0] >= 0) & (rows[0] != row)
        return rows[0][keep][:k], scores[0][keep][:k]
    unit = export.unit_vectors
    scores = unit @ unit[row]
    scores[row] = -np.inf
    k = min(k, export.n_items - 1)
    if k <= 0:
        return np.array([], dtype=np.int64), scores[:0]
    rows, best = top_k(scores[None, :], k)
    return rows[0], best[0]


def customer_vector(export: LoadedExport, user_row: int) -> np.ndarray:
    return export.merchant.user_vectors[user_row]


def purchased_rows(export: LoadedExport, user_row: int) -> np.ndarray:
    p = export.merchant.purchased
    return p.indices[p.indptr[user_row] : p.indptr[user_row + 1]]


def basket_vectors(export: LoadedExport, baskets: list[np.ndarray], cfg: FoldInConfig) -> np.ndarray:
    """Fold a user vector in from each basket (batched). Catalogues over `cfg.full_items` run the
    softmax over the `cfg.candidates` items nearest to each basket's mean plus `cfg.sample` items
    drawn uniformly (seeded by the basket, so an answer is repeatable); see `fold_in_sampled`.

    With a merchant item bias the softmax fold-in scores u . v + b, as training did. With the
    content match, u is folded in against the tower's part of the vectors (training never saw the
    match either) and the basket's own w p follows it, as a customer's does; so does its w x with
    the co-purchase term.
    """
    weight, width = export.content_match
    fold = lambda tower: _tower_basket_vectors(export, tower, baskets, cfg)  # noqa: E731
    return fold_in_with_match(fold, export.item_vectors, baskets, weight, width, export.copurchase)


def _tower_basket_vectors(
    export: LoadedExport, vectors: np.ndarray, baskets: list[np.ndarray], cfg: FoldInConfig
) -> np.ndarray:
    temperature = export.temperature
    bias = export.merchant.item_bias if export.merchant is not None else None
    loss = export.training_loss
    if cfg.method == "softmax" and loss["name"] == "ials":  # the training loss's own solve, as for the softmax
        return fold_in_ials(vectors, baskets, loss["ials_alpha"], loss["user_solve_reg"], cfg.reg, bias)
    if cfg.method != "softmax" or export.n_items <= cfg.full_items:
        return fold_in_many(vectors, baskets, cfg.method, cfg.reg, temperature, item_bias=bias)
    means = np.stack([export.item_vectors[rows].mean(axis=0) for rows in baskets])  # the index's own vectors
    found = search_many(export, means, [cfg.candidates] * len(baskets), [None] * len(baskets))
    out = []
    for rows, (near, _) in zip(baskets, found, strict=True):
        rng = np.random.default_rng(zlib.crc32(np.sort(rows).tobytes()))
        sample = rng.integers(0, export.n_items, cfg.sample)
        out.append(fold_in_sampled(vectors, rows, near, sample, cfg.reg, temperature, bias))
    return np.stack(out)


def results(export: LoadedExport, rows: np.ndarray, scores: np.ndarray) -> list[dict]:
    return [{**export.item_record(int(r)), "score": float(s)} for r, s in zip(rows, scores, strict=True)]
