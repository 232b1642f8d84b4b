"""Fold a user vector in from a list of items, for customers the model has never seen.

An anonymous basket has no user embedding, but the item tower is fixed, so the user vector that
best explains the basket can be solved for. Three rules, measured against each other by
`fedrec evaluate-foldin` (results/foldin-<dataset>.json):
- "softmax": the MAP user vector under the training loss, max_u sum_S log softmax(Vu/T) - reg |u|^2,
  solved by Newton's method (d x d systems, a handful of steps). It is what local training does to
  a user embedding, so it ranks like a learned one. Over a large catalogue the softmax runs over
  candidates (the basket plus the nearest items to the basket mean), where nearly all its mass is.
- "mean": the mean of the basket's item vectors (cheap, a weaker ranking).
- "ridge": least squares min_u |V_S u - 1|^2 + reg |u|^2, the classic matrix-factorisation fold-in.
"""

from __future__ import annotations

import numpy as np

FOLDIN_METHODS = ("softmax", "mean", "ridge")


def fold_in_mean(basket: np.ndarray) -> np.ndarray:
    return basket.mean(axis=0)


def fold_in_ridge(basket: np.ndarray, reg: float) -> np.ndarray:
    gram = basket.T @ basket + reg * np.eye(basket.shape[1])
    return np.linalg.solve(gram, basket.sum(axis=0))


def fold_in_softmax(
    candidates: np.ndarray,
    positives: np.ndarray,
    temperature: float,
    reg: float,
    max_steps: int = 25,
    offsets: np.ndarray | None = None,
) -> np.ndarray:
    """Newton's method on the convex MAP objective; `positives` index rows of `candidates`.

    `offsets` (one per candidate) add a fixed score, such as a merchant's item bias.
    """
    c = candidates.astype(np.float64) / temperature
    o = np.zeros(len(c)) if offsets is None else offsets.astype(np.float64) / temperature
    n_pos = len(positives)
    pos_sum = c[positives].sum(axis=0)
    eye = np.eye(c.shape[1])

    def objective(u: np.ndarray) -> float:
        s = c @ u + o
        top = s.max()
        return n_pos * (top + np.log(np.exp(s - top).sum())) - pos_sum @ u + reg * u @ u

    u = np.zeros(c.shape[1])
    value = objective(u)
    for _ in range(max_steps):
        s = c @ u + o
        p = np.exp(s - s.max())
        p /= p.sum()
        mean = c.T @ p
        grad = n_pos * mean - pos_sum + 2 * reg * u
        hess = n_pos * ((c * p[:, None]).T @ c - np.outer(mean, mean)) + 2 * reg * eye
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-4:  # backtracking keeps each Newton step a descent step
            new_value = objective(u - t * step)
            if new_value <= value:
                break
            t *= 0.5
        u = u - t * step
        converged = value - new_value < 1e-9 * max(1.0, abs(value))
        value = new_value
        if converged:
            break
    return u


def fold_in(
    item_vectors: np.ndarray,
    rows: np.ndarray,
    method: str = "softmax",
    reg: float = 1.0,
    temperature: float = 1.0,
    candidates: np.ndarray | None = None,
    item_bias: np.ndarray | None = None,
) -> np.ndarray:
    """One user vector (dim,) from the catalogue rows of a basket (pure; duplicates count twice).

    `candidates` (catalogue rows) limits the softmax normaliser; None means the whole catalogue.
    `item_bias` (per catalogue row) enters the softmax rule's scores, as in training.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size == 0:
        raise ValueError("fold_in needs at least one item")
    basket = item_vectors[rows].astype(np.float64)
    if method == "mean":
        u = fold_in_mean(basket)
    elif method == "ridge":
        u = fold_in_ridge(basket, reg)
    elif method == "softmax":
        if candidates is None:
            u = fold_in_softmax(item_vectors, rows, temperature, reg, offsets=item_bias)
        else:
            pool, positives = np.unique(np.concatenate([candidates, rows]), return_inverse=True)
            offsets = None if item_bias is None else item_bias[pool]
            u = fold_in_softmax(item_vectors[pool], positives[len(candidates) :], temperature, reg, offsets=offsets)
    else:
        raise ValueError(f"unknown fold-in method {method!r}; choose one of {FOLDIN_METHODS}")
    return u.astype(np.float32)
