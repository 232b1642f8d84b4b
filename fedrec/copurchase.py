"""Co-purchase term: EASE's item-item weights, solved from the merchants' summed Gram, beside the score.

    score(c, i) = u_c . v_i + b_i + (content match) + w s (x_c B)_i

B is EASE's closed form (Steck 2019: P = (G + lam I)^-1, B = I - P / diag(P), diag(B) = 0) on G,
the sum over merchants of each one's X_m' X_m, so it needs no customer's row, only a sum that
secure aggregation can form. x_c is customer c's purchase row, computed and kept at their merchant
like u_c; s scales the term to the spread of the model's own scores, so the weight w means the
same on every shop. Both sides are appended to the vectors ([u, w x] . [v, s B'] is still one inner
product), so evaluation, the export, FAISS and the fold-in rank with it unchanged.

Why: on MovieLens the two-tower model and EASE (the strongest centralized reference there) were
level, and a weighted sum of the two ranked the validation slice above either (README, "Co-purchase
term"). It is not trained with the model: only lam and w are chosen after training, on the
validation slice (`fedrec/federated/copurchase_choice.py`), and w = 0 keeps the model as trained.

Costs: B is catalogue x catalogue, dense, so the term is limited to `MAX_ITEMS` products (the
limit of `make evaluate`'s EASE reference) and `MAX_CELLS` customer-product pairs (each customer's
purchase row is dense while the term is chosen), and it widens every vector by the trained
catalogue. Solving B is one inverse of G per lambda, O(catalogue^3); when G's rank is well below
the catalogue (fewer customers than products, as in a small shop with a long catalogue)
`ease_solver` finds G's range once and solves every lambda in O(catalogue^2 x rank), the same B.

What it reveals: G's sum (how often two products are bought together, over all merchants), which
the export's B carries too; there is no noise in it, so DP runs never use it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

ITEMS = "copurchase.items"  # (trained, trained): row i is s times B's column i
MAX_ITEMS = 16_000  # B is dense, catalogue x catalogue: 1 GB of float32 at this size
MAX_CELLS = 16_000**2  # customers x products held as dense purchase rows while the term is chosen
INVERSE_MAX_ITEMS = 5_000  # up to here one inverse per lambda is cheap (seconds): no range search


def gram(purchases: list[sp.csr_matrix]) -> np.ndarray:
    """Sum over merchants of X_m' X_m (dense, float64): each merchant's term needs only its own
    purchase matrix, and only the sum enters B."""
    total = np.zeros((purchases[0].shape[1],) * 2)
    for x in purchases:
        total += (x.T @ x).toarray()
    return total


def ease_from_gram(g: np.ndarray, lam: float) -> np.ndarray:
    """EASE's B from a Gram matrix: P = (G + lam I)^-1, B = I - P / diag(P), zero diagonal."""
    p = np.linalg.inv(g + lam * np.eye(g.shape[0]))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


def ease_solver(g: np.ndarray, seed: int = 0) -> Callable[[float], np.ndarray]:
    """lam -> EASE's B on G, prepared once for a choice over several lambdas.

    Above `INVERSE_MAX_ITEMS`, when G = U diag(d) U' has rank r well below the catalogue, the
    identity (G + lam I)^-1 = (I - H) / lam with H = U diag(d / (d + lam)) U' gives
    B_ij = H_ij / (1 - H_jj) (i != j): the same B for O(n^2 r) a lambda instead of an O(n^3) inverse
    (6,000 products and 600 customers: 0.4 to 1.4 s against 6.6 s). Otherwise, the inverse.
    """
    n = g.shape[0]
    basis = _range_of(g, np.random.default_rng(seed)) if n > INVERSE_MAX_ITEMS else None
    if basis is None:
        return lambda lam: ease_from_gram(g, lam)
    u, d = basis
    u[np.diag(g) == 0] = 0.0  # products nobody bought: exactly zero rows, as the inverse gives them

    def solve(lam: float) -> np.ndarray:
        h = (u * (d / (d + lam))) @ u.T
        b = h / (1.0 - np.diag(h))[None, :]
        np.fill_diagonal(b, 0.0)
        return b

    return solve


def _range_of(g: np.ndarray, rng: np.random.Generator, start: int = 256) -> tuple[np.ndarray, np.ndarray] | None:
    """G's eigenvectors and eigenvalues on its range (randomised range finder, Halko et al. 2011),
    when its rank is below a third of the catalogue; None otherwise.

    A Gaussian sketch Y = G Omega with more columns than G's rank spans G's whole range, so the
    small eigenproblem Q'GQ on Y's orthonormal basis Q is exact: its eigenvalues past the rank are
    rounding noise, and seeing such a zero is the proof that the sketch was wide enough.
    """
    n = g.shape[0]
    k = start
    while 3 * k <= n:
        q, _ = np.linalg.qr(g @ rng.standard_normal((n, k)))
        d, v = np.linalg.eigh(q.T @ g @ q)
        kept = d > 1e-9 * max(float(d[-1]), 1.0)
        if not kept.all():
            return q @ v[:, kept], d[kept]
        k *= 2
    return None


def item_block(b: np.ndarray, scale: float) -> torch.Tensor:
    """The item side over the trained catalogue: row i is scale times B's column i."""
    return torch.from_numpy(np.ascontiguousarray(scale * b.T, dtype=np.float32))


def purchase_rows(purchases: sp.csr_matrix) -> torch.Tensor:
    """x for every customer (row of `purchases`): their purchase row, dense float32."""
    return torch.from_numpy(purchases.toarray().astype(np.float32))


def with_purchases(users: torch.Tensor, rows: torch.Tensor, weight: float) -> torch.Tensor:
    """[u, w x]: a merchant's user vectors with their purchase rows (`purchase_rows`, over the
    trained catalogue)."""
    return torch.cat([users, weight * rows.to(users.dtype)], 1)


def with_block(vectors: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """[v, s B']: product vectors with their co-purchase block. Rows past the block's (products
    nobody had bought when B was solved) get zeros."""
    rows = block[: vectors.shape[0]].to(vectors.dtype)
    if rows.shape[0] < vectors.shape[0]:
        rows = torch.cat([rows, rows.new_zeros(vectors.shape[0] - rows.shape[0], rows.shape[1])])
    return torch.cat([vectors, rows], 1)


def score_spread(users: torch.Tensor, items: torch.Tensor) -> tuple[float, float, int]:
    """(sum, sum of squares, count) of one merchant's scores over every product (`users` and
    `items` as `model.scoring_vectors` gives them, bias included): the sums the spread of the
    model's scores is pooled from."""
    s = (users @ items.T).double()
    return float(s.sum()), float(s.pow(2).sum()), int(s.numel())


def spread(parts: list[tuple[float, float, int]]) -> float:
    """Standard deviation from pooled (sum, sum of squares, count)."""
    total, squares, n = (sum(p[i] for p in parts) for i in range(3))
    if n == 0:
        return 0.0
    mean = total / n
    return float(np.sqrt(max(squares / n - mean * mean, 0.0)))
