"""Full-ranking metrics (pure functions): recall@k and NDCG@k with binary gains.

recall@k = hits in top k / number of the user's test items (ml100k-temporal's definition, not
divided by min(k, n)); NDCG@k = DCG@k / ideal DCG@k. Averaged over users with at least one
train and one test item; the user's own train items are removed from the ranking.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

DEFAULT_KS = (10, 20, 50)
METRICS = ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20")


def seed_std(values: list[float] | np.ndarray) -> float:
    """The spread every report states beside a mean over seeds: the sample standard deviation
    (ddof 1), 0 for a single seed."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def topk_items(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    exclude: sp.csr_matrix,
    k: int,
    batch_size: int = 4096,
) -> np.ndarray:
    """Top-k item indices per user over the whole catalogue, excluded items masked out."""
    k = min(k, item_vecs.shape[0])
    out = np.empty((user_vecs.shape[0], k), dtype=np.int64)
    for start in range(0, user_vecs.shape[0], batch_size):
        stop = min(start + batch_size, user_vecs.shape[0])
        scores = (user_vecs[start:stop] @ item_vecs.T).float()
        ex = exclude[start:stop].tocoo()
        scores[torch.from_numpy(ex.row.astype(np.int64)), torch.from_numpy(ex.col.astype(np.int64))] = float("-inf")
        out[start:stop] = torch.topk(scores, k, dim=1).indices.numpy()
    return out


def hit_matrix(topk: np.ndarray, truth: sp.csr_matrix) -> np.ndarray:
    """hits[u, r] = 1 when the item ranked r for user u is in u's truth set."""
    rows = np.repeat(np.arange(topk.shape[0]), topk.shape[1])
    return np.asarray(truth[rows, topk.ravel()]).reshape(topk.shape) > 0


def per_user_metrics(topk: np.ndarray, truth: sp.csr_matrix, ks=DEFAULT_KS) -> dict[str, np.ndarray]:
    """Per-user recall@k and ndcg@k (k in `ks`); users without truth get NaN."""
    hits = hit_matrix(topk, truth).astype(np.float64)
    n_true = np.asarray(truth.getnnz(axis=1), dtype=np.float64)
    discounts = 1.0 / np.log2(np.arange(2, topk.shape[1] + 2))
    ideal = np.concatenate([[0.0], np.cumsum(discounts)])
    with np.errstate(invalid="ignore", divide="ignore"):
        out: dict[str, np.ndarray] = {}
        for k in ks:
            kk = min(k, topk.shape[1])
            out[f"recall@{k}"] = hits[:, :kk].sum(1) / n_true
            dcg = (hits[:, :kk] * discounts[:kk]).sum(1)
            out[f"ndcg@{k}"] = dcg / ideal[np.minimum(n_true, kk).astype(int)]
    for v in out.values():
        v[n_true == 0] = np.nan
    return out


def eligible_users(train: sp.csr_matrix, test: sp.csr_matrix) -> np.ndarray:
    return (train.getnnz(axis=1) > 0) & (test.getnnz(axis=1) > 0)


# ---- beyond accuracy: how concentrated the lists are, how coherent "similar items" are -------------


def catalogue_coverage(topk: np.ndarray, n_items: int) -> float:
    """Share of the catalogue that appears in at least one list."""
    return float(len(np.unique(topk)) / n_items)


def top1_share(topk: np.ndarray) -> float:
    """Share of users whose first item is the single most common first item (1/users is ideal)."""
    if topk.shape[0] == 0:
        return float("nan")
    return float(np.bincount(topk[:, 0]).max() / topk.shape[0])


def same_label_rate_rows(
    score_rows: Callable[[np.ndarray], np.ndarray], n_items: int, labels: np.ndarray, k: int = 10, chunk: int = 2048
) -> float:
    """`same_label_rate` with the similarity made `chunk` rows at a time (`score_rows(rows)` ->
    [len(rows), items]): the same number, without an items x items matrix, which a catalogue of
    62,572 products would need 31 GB for."""
    k = min(k, n_items - 1)
    labelled = labels.sum(axis=1) > 0
    shared_pairs, pairs = 0, 0
    for start in range(0, n_items, chunk):
        rows = np.arange(start, min(start + chunk, n_items))
        sim = np.array(score_rows(rows), dtype=np.float64, copy=True)
        sim[np.arange(len(rows)), rows] = -np.inf
        neighbours = np.argpartition(-sim, k, axis=1)[:, :k]
        keep = labelled[rows]
        shared = (labels[rows[keep], None, :] * labels[neighbours[keep]]).sum(axis=2) > 0
        shared_pairs, pairs = shared_pairs + int(shared.sum()), pairs + shared.size
    return shared_pairs / pairs if pairs else float("nan")


def same_label_rate(similarity: np.ndarray, labels: np.ndarray, k: int = 10) -> float:
    """For each item with a label, the share of its k most similar items (itself left out) that
    share a label with it: a category (synthetic shop) or a genre (MovieLens).

    similarity: [items, items], row i scores every item as a neighbour of i.
    labels: [items, labels] 0/1 matrix; items without any label are left out of the mean.
    """
    sim = np.asarray(similarity)
    return same_label_rate_rows(lambda rows: sim[rows], sim.shape[0], labels, k, chunk=max(1, sim.shape[0]))


def basket_label_share(scores: np.ndarray, baskets: list[np.ndarray], basket_labels: np.ndarray, labels: np.ndarray,
                       k: int = 10) -> float:  # fmt: skip
    """Mean over baskets of the share of the top-k (the basket's own items left out) that carry
    the basket's label: does a basket of perfumes get beauty products first?

    scores: [baskets, items]; basket_labels: the label index of each basket; labels: [items, labels] 0/1.
    """
    scores = np.array(scores, dtype=np.float64, copy=True)
    for i, rows in enumerate(baskets):
        scores[i, rows] = -np.inf
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    return float(np.mean(labels[top, basket_labels[:, None]].mean(axis=1)))


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row scaled to length 1 (a zero row stays zero): inner products of these are cosines."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def cosine(vectors: np.ndarray) -> np.ndarray:
    unit = unit_rows(vectors)
    return unit @ unit.T
