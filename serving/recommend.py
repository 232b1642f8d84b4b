"""Ranking over one loaded export: the serving path from a query vector to top-k catalogue rows.

Functions take the `LoadedExport` a request picked up, never the app's current one, so a request
that started before a reload finishes on the version it started with.
"""

from __future__ import annotations

import numpy as np

from fedrec.serving.export_store import LoadedExport
from fedrec.serving.foldin import fold_in


def search(
    export: LoadedExport,
    query: np.ndarray,
    k: int,
    exclude: np.ndarray | None = None,
    merchant_bias: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows and scores for one query vector, with `exclude` rows removed.

    Over-fetches by the number of excluded rows so that k results remain whenever the
    catalogue has them (HNSW widens its search to at least the number asked for).
    merchant_bias: score u . v + b with this merchant's item bias when it has one (customer and
    basket recommendations), through its own index over [v, b] queried with [u, 1].
    """
    index = export.index
    merchant = export.merchant
    if merchant_bias and merchant is not None and merchant.index is not None:
        index, query = merchant.index, np.append(query, np.float32(1.0))
    n_exclude = 0 if exclude is None else len(exclude)
    want = min(k + n_exclude, export.n_items)
    scores, rows = index.search(np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1), want)
    scores, rows = scores[0], rows[0]
    keep = rows >= 0
    if n_exclude:
        keep &= ~np.isin(rows, exclude)
    return rows[keep][:k], scores[keep][:k]


def customer_vector(export: LoadedExport, user_row: int) -> np.ndarray:
    return export.merchant.user_vectors[user_row]


def purchased_rows(export: LoadedExport, user_row: int) -> np.ndarray:
    p = export.merchant.purchased
    return p.indices[p.indptr[user_row] : p.indptr[user_row + 1]]


def basket_vector(export: LoadedExport, rows: np.ndarray, method: str, reg: float, max_candidates: int) -> np.ndarray:
    """Fold a user vector in from a basket; large catalogues restrict the softmax to candidates.

    With a merchant item bias the softmax fold-in scores u . v + b, as training did.
    """
    temperature = float(export.card.get("config", {}).get("local", {}).get("temperature", 1.0))
    bias = export.merchant.item_bias if export.merchant is not None else None
    candidates = None
    if method == "softmax" and export.n_items > max_candidates:
        mean = export.item_vectors[rows].mean(axis=0)
        candidates, _ = search(export, mean, max_candidates)
    return fold_in(export.item_vectors, rows, method, reg, temperature, candidates, bias)


def results(export: LoadedExport, rows: np.ndarray, scores: np.ndarray) -> list[dict]:
    return [{**export.item_record(int(r)), "score": float(s)} for r, s in zip(rows, scores, strict=True)]
