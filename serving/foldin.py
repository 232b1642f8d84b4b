"""Fold a user vector in from a list of items, for customers the model has never seen.

An anonymous basket has no user embedding, but the item tower is fixed, so the user vector that
best explains the basket can be solved for. Three rules, measured against each other by
`fedrec evaluate-foldin` (results/foldin-<dataset>.json):
- "softmax": the MAP user vector under the training loss, max_u sum_S log softmax(Vu/T) - reg |u|^2,
  solved by Newton's method (d x d systems, a handful of steps). It is what local training does to
  a user embedding, so it ranks like a learned one. Over a large catalogue the softmax runs over
  the items nearest to the basket exactly and over a weighted uniform sample for the rest
  (`fold_in_sampled`).
- "mean": the mean of the basket's item vectors (cheap, a weaker ranking).
- "ridge": least squares min_u |V_S u - 1|^2 + reg |u|^2, the classic matrix-factorisation fold-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrec.ials_users import solve_ials_baskets
from fedrec.softmax_foldin import EXACT_TOL, FAST_HESSIAN_ITEMS, FAST_TOL, fold_in_softmax_batch, sampled_pool

__all__ = [
    "EXACT_TOL", "FAST_HESSIAN_ITEMS", "FAST_TOL", "FoldInConfig", "fold_in", "fold_in_ials", "fold_in_many",
    "fold_in_sampled",
]  # fmt: skip

FOLDIN_METHODS = ("softmax", "mean", "ridge")


@dataclass(frozen=True)
class FoldInConfig:
    """How the serving path folds in a basket (ServeSettings passes its values)."""

    method: str = "softmax"
    reg: float = 1.0
    full_items: int = 5_000  # the softmax runs over the whole catalogue up to this many items
    candidates: int = 1_000  # else over this many items nearest to the basket ...
    sample: int = 1_000  # ... plus this many drawn uniformly (importance-weighted)


def fold_in_ials(
    item_vectors: np.ndarray,
    baskets: list[np.ndarray],
    ials_alpha: float,
    user_solve_reg: float,
    reg: float,
    item_bias: np.ndarray | None = None,
) -> np.ndarray:
    """The "softmax" rule for a model trained with the ials loss: that loss's own user solve (ALS's
    exact user step) at the training's `user_solve_reg` (`reg` where training had none), so a basket
    folds in as training solved a customer. The API and `make evaluate` both fold in through it."""
    return solve_ials_baskets(item_vectors, baskets, ials_alpha, user_solve_reg or reg, item_bias)


def fold_in_mean(basket: np.ndarray) -> np.ndarray:
    return basket.mean(axis=0)


def fold_in_ridge(basket: np.ndarray, reg: float) -> np.ndarray:
    gram = basket.T @ basket + reg * np.eye(basket.shape[1])
    return np.linalg.solve(gram, basket.sum(axis=0))


def fold_in_many(
    item_vectors: np.ndarray,
    baskets: list[np.ndarray],
    method: str = "softmax",
    reg: float = 1.0,
    temperature: float = 1.0,
    candidates: np.ndarray | None = None,
    item_bias: np.ndarray | None = None,
    tol: float = FAST_TOL,
    hessian_items: int | None = FAST_HESSIAN_ITEMS,
) -> np.ndarray:
    """One user vector per basket, (baskets, dim), from catalogue rows (pure; duplicates count twice).

    `candidates` (catalogue rows) limits the softmax normaliser; None means the whole catalogue.
    `item_bias` (per catalogue row) enters the softmax rule's scores, as in training.
    `tol` and `hessian_items` trade exactness for speed (see FAST_TOL); `tol=EXACT_TOL,
    hessian_items=None` is the exact solve.
    """
    baskets = [np.asarray(rows, dtype=np.int64) for rows in baskets]
    if not baskets or any(rows.size == 0 for rows in baskets):
        raise ValueError("fold_in needs at least one item in every basket")
    if method == "mean":
        u = np.stack([fold_in_mean(item_vectors[rows].astype(np.float64)) for rows in baskets])
    elif method == "ridge":
        u = np.stack([fold_in_ridge(item_vectors[rows].astype(np.float64), reg) for rows in baskets])
    elif method == "softmax":
        if candidates is None:
            pool, positives = item_vectors, baskets
            offsets = item_bias
        else:
            rows_all = np.concatenate([candidates, *baskets])
            index, inverse = np.unique(rows_all, return_inverse=True)
            pool = item_vectors[index]
            offsets = None if item_bias is None else item_bias[index]
            splits = np.cumsum([len(b) for b in baskets])[:-1]
            positives = np.split(inverse[len(candidates) :], splits)
        u = fold_in_softmax_batch(
            pool, positives, temperature, reg, offsets=offsets, tol=tol, hessian_items=hessian_items
        )
    else:
        raise ValueError(f"unknown fold-in method {method!r}; choose one of {FOLDIN_METHODS}")
    return u.astype(np.float32)


def fold_in_sampled(
    item_vectors: np.ndarray,
    rows: np.ndarray,
    near: np.ndarray,
    sample: np.ndarray,
    reg: float,
    temperature: float,
    item_bias: np.ndarray | None = None,
) -> np.ndarray:
    """The softmax fold-in over a large catalogue, from a pool instead of every item.

    The softmax normaliser sum_i exp(s_i) runs over the items `near` the basket (where most of its
    mass is) exactly, and estimates the rest from `sample`, items drawn uniformly from the others,
    each standing in for (others / len(sample)) items: an importance weight that enters as a score
    offset of T log w. Why not `near` alone: on the 1M benchmark catalogue the top-10 from the
    5,000 nearest items alone overlapped the full-catalogue solve's by 0.37 on average, from 1,000
    nearest plus 1,000 sampled by 0.97 (results/bench-serve.json, 40 baskets).
    """
    rows = np.asarray(rows, dtype=np.int64)
    close = np.union1d(near, rows)
    pool, offsets = sampled_pool(close, sample, len(item_vectors), temperature)
    if item_bias is not None:
        offsets = offsets + item_bias[pool].astype(np.float64)
    positives = np.searchsorted(close, rows)
    u = fold_in_softmax_batch(
        item_vectors[pool], [positives], temperature, reg, offsets=offsets, tol=FAST_TOL,
        hessian_items=FAST_HESSIAN_ITEMS,
    )  # fmt: skip
    return u[0].astype(np.float32)


def fold_in(
    item_vectors: np.ndarray,
    rows: np.ndarray,
    method: str = "softmax",
    reg: float = 1.0,
    temperature: float = 1.0,
    candidates: np.ndarray | None = None,
    item_bias: np.ndarray | None = None,
    tol: float = EXACT_TOL,
    hessian_items: int | None = None,
) -> np.ndarray:
    """One basket's user vector (dim,); the exact solve unless told otherwise."""
    return fold_in_many(item_vectors, [rows], method, reg, temperature, candidates, item_bias, tol, hessian_items)[0]
