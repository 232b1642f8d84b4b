"""The softmax MAP user vector: the user vector that best explains a set of purchases under the
training loss, with the item vectors fixed.

    max_u  sum_{s in S} log softmax(V u / T)_s  -  reg |u|^2

It is convex in u, so Newton's method solves it in a handful of d x d steps. Two users of it: the
serving path folds in an anonymous basket (`fedrec.serving.foldin`), and a merchant's local
update starts each round from its customers' solved vectors (`LocalConfig.user_solve_reg`), so
its user table is never under-fit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp

EXACT_TOL = 1e-9
# The serving solve: stop at a relative decrease of 1e-6 and build each Newton step's Hessian from
# the 256 most probable candidates (the gradient stays exact, so it converges to the same optimum).
# On the synthetic export it is 4-6x faster than the exact solve, with the same top-20 for every
# one of 128 customers' baskets; `make evaluate-foldin` measures both (results/foldin-*.json).
FAST_TOL = 1e-6
FAST_HESSIAN_ITEMS = 256


def _objective_and_softmax(
    c: np.ndarray, o: np.ndarray, u: np.ndarray, n_pos: np.ndarray, pos_sum: np.ndarray, reg: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per basket (rows of u): the objective n log sum_i exp(c_i . u + o_i) - sum_S c_s . u + reg |u|^2,
    and the softmax p over the candidates at u (one pass over the candidates serves both)."""
    s = u @ c.T + o
    top = s.max(axis=1, keepdims=True)
    e = np.exp(s - top)
    z = e.sum(axis=1)
    value = n_pos * (top[:, 0] + np.log(z)) - (pos_sum * u).sum(axis=1) + reg * (u * u).sum(axis=1)
    return value, e / z[:, None]


def _covariance(c: np.ndarray, p: np.ndarray, mean: np.ndarray, top: int | None) -> np.ndarray:
    """Per basket, the covariance of the candidates under its softmax p: the Hessian's data term.

    With `top`, only the `top` most probable candidates enter (a PSD lower bound of the full
    covariance): the gradient stays exact, so Newton still converges to the same optimum, with
    steps that cost top x dim^2 instead of catalogue x dim^2.
    """
    if top is None or top >= c.shape[0]:
        centred = c[None, :, :] - mean[:, None, :]
        weights = p[:, :, None]
    else:
        idx = np.argpartition(p, -top, axis=1)[:, -top:]
        centred = c[idx] - mean[:, None, :]
        weights = np.take_along_axis(p, idx, axis=1)[:, :, None]
    return np.matmul((centred * weights).transpose(0, 2, 1), centred)


def fold_in_softmax_batch(
    candidates: np.ndarray,
    baskets: list[np.ndarray],
    temperature: float,
    reg: float,
    max_steps: int = 25,
    offsets: np.ndarray | None = None,
    tol: float = EXACT_TOL,
    hessian_items: int | None = None,
    init: np.ndarray | None = None,
) -> np.ndarray:
    """Newton's method on the convex MAP objective of several baskets at once -> (baskets, dim).

    Each basket is an array of rows of `candidates` (its positives; duplicates count twice).
    Solving a batch together turns each Newton step into matrix-matrix products, which is what
    makes the serving path's micro-batches cheap; every basket still has its own step size and
    stopping test, so the answer is the same as solving it alone.
    `offsets` (one per candidate) add a fixed score, such as a merchant's item bias. `init` (one
    row per basket) starts Newton there instead of at zero: the objective is convex, so the
    optimum is the same, reached in fewer steps from a nearby start.
    """
    c = candidates.astype(np.float64) / temperature
    o = np.zeros(len(c)) if offsets is None else offsets.astype(np.float64) / temperature
    n_baskets, dim = len(baskets), c.shape[1]
    n_pos = np.array([len(b) for b in baskets], dtype=np.float64)
    pos_sum = np.stack([c[np.asarray(b, dtype=np.int64)].sum(axis=0) for b in baskets])
    eye = np.eye(dim)
    u = np.zeros((n_baskets, dim)) if init is None else init.astype(np.float64, copy=True)
    value, p = _objective_and_softmax(c, o, u, n_pos, pos_sum, reg)
    active = np.arange(n_baskets)
    for _ in range(max_steps):
        if active.size == 0:
            break
        ua, na, sa, pa = u[active], n_pos[active], pos_sum[active], p[active]
        mean = pa @ c
        grad = na[:, None] * mean - sa + 2 * reg * ua
        hess = na[:, None, None] * _covariance(c, pa, mean, hessian_items) + 2 * reg * eye
        step = np.linalg.solve(hess, grad[:, :, None])[:, :, 0]
        t = np.ones(len(active))
        old = value[active]
        new_value, new_p = _objective_and_softmax(c, o, ua - step, na, sa, reg)
        worse = new_value > old
        while worse.any() and t.min() > 1e-4:  # backtracking keeps each Newton step a descent step
            t[worse] *= 0.5
            idx = np.flatnonzero(worse)
            new_value[idx], new_p[idx] = _objective_and_softmax(
                c, o, ua[idx] - t[idx, None] * step[idx], na[idx], sa[idx], reg
            )
            worse = new_value > old
        u[active] = ua - t[:, None] * step
        value[active], p[active] = new_value, new_p
        converged = old - new_value < tol * np.maximum(1.0, np.abs(old))
        active = active[~converged]
    return u


def solve_user_vectors(
    item_vectors: np.ndarray,
    purchases: sp.csr_matrix,
    temperature: float,
    reg: float,
    offsets: np.ndarray | None = None,
    init: np.ndarray | None = None,
    max_steps: int = 25,
    hessian_items: int = FAST_HESSIAN_ITEMS,
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """The MAP vector of every customer with purchases (rows of `purchases`), in chunks.

    Returns (rows solved, their vectors). `init` (one row per customer) is a warm start; with
    `max_steps` small it makes a cheap refinement of last round's vectors rather than a full solve.
    The fast settings (relative tolerance 1e-6, Hessian from the 256 most probable items) converge
    to the same optimum as the exact solve.
    """
    rows = np.flatnonzero(purchases.getnnz(axis=1) > 0)
    out = np.empty((rows.size, item_vectors.shape[1]))
    indptr, indices = purchases.indptr, purchases.indices
    for start in range(0, rows.size, chunk):
        part = rows[start : start + chunk]
        baskets = [indices[indptr[r] : indptr[r + 1]] for r in part]
        out[start : start + chunk] = fold_in_softmax_batch(
            item_vectors, baskets, temperature, reg, offsets=offsets, tol=FAST_TOL, hessian_items=hessian_items,
            init=None if init is None else init[part], max_steps=max_steps,
        )  # fmt: skip
    return rows, out


def sampled_pool(
    exact: np.ndarray, sample: np.ndarray, n_items: int, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates for a softmax over a catalogue too large to score whole, and their score offsets.

    The normaliser sum_i exp(s_i) runs exactly over `exact` (sorted, unique item ids) and estimates
    the rest from the items of `sample` (drawn uniformly) outside them, each standing in for
    (others / drawn) items: an importance weight that enters as an offset of T log w on its score
    (the solve divides offsets by T). Returns (pool: `exact` first, then the drawn; offsets).
    """
    far = np.setdiff1d(sample, exact)
    pool = np.concatenate([exact, far])
    offsets = np.zeros(len(pool))
    if len(far):
        offsets[len(exact) :] = temperature * np.log((n_items - len(exact)) / len(far))
    return pool, offsets


def solve_user_vectors_sampled(
    item_vectors: Callable[[np.ndarray], np.ndarray],
    purchases: sp.csr_matrix,
    n_items: int,
    temperature: float,
    reg: float,
    negatives: int,
    rng: np.random.Generator,
    init: np.ndarray | None = None,
    offsets: np.ndarray | None = None,
    max_steps: int = 25,
    hessian_items: int = FAST_HESSIAN_ITEMS,
    chunk: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """`solve_user_vectors` for a catalogue too large to score whole: each chunk of customers is
    solved over the products they bought, exactly, plus `negatives` uniform draws standing in for
    the rest (`sampled_pool`), the estimate that sampled softmax training makes with its uniform
    negatives. The objective stays convex, so Newton solves it as before, at chunk x (bought +
    drawn) x dim a step instead of chunk x catalogue x dim. `item_vectors(ids)` gives the vectors
    of product ids (the tower on just those items); `offsets` (one per product of the catalogue)
    add a fixed score, as in `solve_user_vectors`.
    """
    rows = np.flatnonzero(purchases.getnnz(axis=1) > 0)
    parts = [np.empty((0, item_vectors(np.empty(0, dtype=np.int64)).shape[1]))]
    for start in range(0, rows.size, chunk):
        part = rows[start : start + chunk]
        sub = purchases[part]
        bought = np.unique(sub.indices)
        pool, shift = sampled_pool(bought, rng.integers(0, n_items, size=negatives), n_items, temperature)
        if offsets is not None:
            shift = shift + offsets[pool]
        pos = np.searchsorted(bought, sub.indices)  # each purchase's place in the pool
        baskets = [pos[sub.indptr[r] : sub.indptr[r + 1]] for r in range(len(part))]
        parts.append(fold_in_softmax_batch(
            item_vectors(pool), baskets, temperature, reg, max_steps=max_steps, offsets=shift, tol=FAST_TOL,
            hessian_items=hessian_items, init=None if init is None else init[part],
        ))  # fmt: skip
    return rows, np.concatenate(parts)
