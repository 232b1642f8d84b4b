"""Non-federated reference models, trained on pooled data (what no merchant may do alone).

Both return (user vectors, item vectors) so every method is scored by the same ranking code.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.features import tfidf_rows
from fedrec.ials_users import solve_ials_baskets


def popularity(train: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor]:
    """Score = number of buyers; a 1-d 'embedding' so ranking code is shared."""
    counts = np.asarray(train.sum(axis=0)).ravel().astype(np.float32)
    return torch.ones(train.shape[0], 1), torch.from_numpy(counts[:, None])


def implicit_als(
    train: sp.csr_matrix,
    factors: int = 32,
    regularization: float = 0.1,
    alpha: float = 5.0,
    iterations: int = 15,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """implicit's ALS. The defaults are the shared README's settings for MovieLens (32 factors, reg
    0.1, alpha 5); `make evaluate` chooses its own from `ALS_GRID` on each dataset's validation slice."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit parallelises itself; a BLAS pool on top only contends
        model = AlternatingLeastSquares(
            factors=factors,
            regularization=regularization,
            alpha=alpha,
            iterations=iterations,
            random_state=seed,
        )
        model.fit(train.tocsr().astype(np.float32), show_progress=False)
    return torch.from_numpy(np.asarray(model.user_factors)), torch.from_numpy(np.asarray(model.item_factors))


def als_fold_in(
    item_factors: np.ndarray, baskets: list[np.ndarray], alpha: float = 5.0, reg: float = 0.1
) -> np.ndarray:
    """ALS's user vector for a new basket, as implicit's `recalculate_user` solves it: confidence
    c = alpha on the basket's items (1 elsewhere), (V'V + (c - 1) V_S'V_S + reg I) u = c V_S' 1."""
    # implicit weighs a purchase alpha (not 1 + alpha): the ials solve with alpha - 1.
    return solve_ials_baskets(item_factors, baskets, alpha - 1.0, reg)


# What `make evaluate` searches on the validation slice for implicit's ALS, as it searches EASE's
# lambda: a reference tuned on one dataset (the shared README's, on MovieLens) is not a fair one
# on another shop's file.
# Wide enough that the shipped datasets' choices lie inside it, not on its edge.
ALS_GRID: dict[str, tuple[float, ...]] = {
    "factors": (4, 8, 16, 32, 64, 128),
    "regularization": (0.01, 0.1, 1.0, 10.0),
    "alpha": (1.0, 5.0, 20.0, 50.0),
}
EASE_LAMBDAS = (10.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)


def ease_weights(train: sp.csr_matrix, lam: float) -> np.ndarray:
    """EASE (Steck, 2019), closed form: P = (X'X + lam I)^-1, B = I - P / diag(P), diag(B) = 0."""
    gram = (train.T @ train).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += lam
    p = np.linalg.inv(gram)
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def ease(train: sp.csr_matrix, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores X B as (user vectors, item vectors): a user's vector is its purchase row, an item's
    is its column of B, so every method is ranked by the same dot-product code."""
    b = ease_weights(train, lam)
    users = torch.from_numpy(train.toarray().astype(np.float32))
    return users, torch.from_numpy(np.ascontiguousarray(b.T, dtype=np.float32))


# Item-kNN, the neighbourhood reference issue 9 names (the held-back shop's model fell below it):
# implicit's item-item recommenders, the similarity weighting and the neighbour count chosen on
# validation as EASE's lambda is.
KNN_GRID: dict[str, tuple] = {
    "similarity": ("cosine", "bm25", "tfidf"),
    "neighbours": (10, 20, 50, 100, 200, 500, 1000),
}


def item_knn_similarity(train: sp.csr_matrix, similarity: str, neighbours: int) -> sp.csr_matrix:
    """implicit's item-item similarity (items x items, each row keeping its `neighbours` largest):
    cosine, BM25- or TF-IDF-weighted cosine between the products' buyer columns."""
    from implicit.nearest_neighbours import BM25Recommender, CosineRecommender, TFIDFRecommender
    from threadpoolctl import threadpool_limits

    kinds = {"cosine": CosineRecommender, "bm25": BM25Recommender, "tfidf": TFIDFRecommender}
    if similarity not in kinds:
        raise ValueError(f"item-kNN similarity {similarity!r}: one of {', '.join(kinds)}")
    model = kinds[similarity](K=int(neighbours), num_threads=1)
    with threadpool_limits(1, "blas"), warnings.catch_warnings():
        # BM25 and TF-IDF weighting hand implicit's own fit a COO matrix, and it warns about itself
        warnings.filterwarnings("ignore", message="Method expects CSR input", module="implicit")
        model.fit(sp.csr_matrix(train, dtype=np.float32), show_progress=False)
    return sp.csr_matrix(model.similarity, dtype=np.float32)


def item_knn(train: sp.csr_matrix, similarity: str, neighbours: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Scores X S as implicit's `recommend` computes them, as (user vectors, item vectors) like
    `ease`: a user's vector is its purchase row, an item's its column of S. Also S itself (dense),
    whose row i is the products most similar to i (the "similar items" a neighbourhood model gives)."""
    s = item_knn_similarity(train, similarity, neighbours).toarray()
    users = torch.from_numpy(sp.csr_matrix(train, dtype=np.float32).toarray())
    return users, torch.from_numpy(np.ascontiguousarray(s.T)), s


def content_profile_scores(bought: sp.csr_matrix, tokens: torch.Tensor, n_known: int, padding: int) -> np.ndarray:
    """A content-only recommender for new products: cosine between the TF-IDF token profile of
    what a customer bought (of the first `n_known` products) and each later product's tokens
    -> (customers, new products) scores."""
    x = tfidf_rows(tokens, padding)
    return np.asarray((bought @ x[:n_known] @ x[n_known:].T).todense())
