"""The exact user vectors under the iALS loss: ALS's user step, for a merchant's own customers.

With the item vectors V (and biases b) fixed, customer u's part of the loss is quadratic, so its
minimiser solves one d x d system (Hu et al., 2008):

    (V'V + alpha V_S'V_S + reg I) u = (1 + alpha) V_S'1 - alpha V_S'b_S - V'b

The local update starts each round from these (`LocalConfig.user_solve_reg`), and the serving path
folds an anonymous basket in the same way. Vectorised: the per-customer V_S'V_S are summed over
purchases in chunks, and all systems solve in one batched call.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

CHUNK = 8192  # purchases per outer-product chunk: bounds the chunk x dim x dim temporary


def ials_normal_terms(
    items: np.ndarray,
    purchases: sp.csr_matrix,
    alpha: float,
    bias: np.ndarray | None = None,
    shared_lhs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's purchase terms of its normal equations, in float64: (alpha V_S'V_S, one d x d per
    row of `purchases`; (1 + alpha) V_S'1 - alpha V_S'b_S, one d-vector per row). V'V, reg I and
    -V'b are the same for every row and left out: the federated item step sums these terms over
    merchants before adding them (`fedrec/federated/ials_item_step.py`). `shared_lhs`, a d x d
    term every row's lhs starts from (V'V + reg I for the user step), keeps its float sums in
    the order they always had."""
    v = np.asarray(items, dtype=np.float64)
    n_rows, dim = purchases.shape[0], v.shape[1]
    coo = purchases.tocoo()
    rows, cols = coo.row.astype(np.int64), coo.col.astype(np.int64)
    lhs = np.zeros((n_rows, dim, dim)) if shared_lhs is None else np.repeat(shared_lhs[None], n_rows, axis=0)
    rhs = np.zeros((n_rows, dim))
    b = None if bias is None else np.asarray(bias, dtype=np.float64)
    for start in range(0, len(rows), CHUNK):
        r, c = rows[start : start + CHUNK], cols[start : start + CHUNK]
        vs = v[c]
        # rows x purchases of the chunk: one sparse product sums each row's terms
        owner = sp.csr_matrix((np.ones(len(r)), (r, np.arange(len(r)))), shape=(n_rows, len(r)))
        lhs += (owner @ (alpha * vs[:, :, None] * vs[:, None, :]).reshape(len(r), -1)).reshape(n_rows, dim, dim)
        target = (1.0 + alpha) - (alpha * b[c] if b is not None else 0.0)
        rhs += owner @ (vs * np.reshape(target, (-1, 1)))
    return lhs, rhs


def solve_ials_users(
    items: np.ndarray,
    purchases: sp.csr_matrix,
    alpha: float,
    reg: float,
    bias: np.ndarray | None = None,
) -> np.ndarray:
    """One vector per row of `purchases` (customers x items, nonzero = bought), in float64.

    numpy only: the serving path, which never imports torch, folds baskets in with it too. A
    customer without purchases gets the all-negatives optimum (zero when there is no bias)."""
    v = np.asarray(items, dtype=np.float64)
    lhs, rhs = ials_normal_terms(v, purchases, alpha, bias, v.T @ v + reg * np.eye(v.shape[1]))
    if bias is not None:
        rhs -= v.T @ np.asarray(bias, dtype=np.float64)
    return np.linalg.solve(lhs, rhs[:, :, None])[:, :, 0]


def solve_ials_baskets(
    items: np.ndarray, baskets: list[np.ndarray], alpha: float, reg: float, bias: np.ndarray | None = None
) -> np.ndarray:
    """`solve_ials_users` for baskets of item rows, one vector each: how the API folds a basket into
    an ials-trained model, and implicit's ALS fold-in. A product listed twice counts once, as a
    purchase does in training."""
    if not baskets or any(len(b) == 0 for b in baskets):
        raise ValueError("fold_in needs at least one item in every basket")
    rows = np.concatenate([np.full(len(b), i) for i, b in enumerate(baskets)])
    cols = np.concatenate(baskets)
    bought = sp.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(baskets), len(items)))
    return solve_ials_users(items, bought, alpha, reg, bias)
