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
import torch

CHUNK = 8192  # purchases per outer-product chunk: bounds the chunk x dim x dim temporary


def solve_ials_users(
    items: torch.Tensor,
    purchases: sp.csr_matrix,
    alpha: float,
    reg: float,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """One vector per row of `purchases` (customers x items, nonzero = bought), in float64.

    A customer without purchases gets the all-negatives optimum (zero when there is no bias)."""
    v = items.double()
    n_users, dim = purchases.shape[0], v.shape[1]
    coo = purchases.tocoo()
    rows = torch.from_numpy(coo.row.astype(np.int64))
    cols = torch.from_numpy(coo.col.astype(np.int64))
    lhs = (v.T @ v + reg * torch.eye(dim, dtype=v.dtype)).expand(n_users, dim, dim).clone()
    rhs = torch.zeros(n_users, dim, dtype=v.dtype)
    b = None if bias is None else bias.double()
    for start in range(0, len(rows), CHUNK):
        r, c = rows[start : start + CHUNK], cols[start : start + CHUNK]
        vs = v[c]
        lhs.index_add_(0, r, alpha * vs[:, :, None] * vs[:, None, :])
        target = (1.0 + alpha) - (alpha * b[c] if b is not None else 0.0)
        rhs.index_add_(0, r, vs * (target[:, None] if b is not None else target))
    if b is not None:
        rhs -= v.T @ b
    return torch.linalg.solve(lhs, rhs)
