"""Content match: a fixed term beside the learned score, chosen on validation.

    score(c, i) = u_c . v_i + b_i + w * p_c . z_i

z_i is product i's TF-IDF token vector projected onto the catalogue's leading singular directions
(unit length); p_c is the unit-length sum of z over what customer c bought. Both sides are
appended to the vectors, so [u, w p] . [v, z] is still one inner product for FAISS, the export
and every evaluation.

Why: the learned vectors summarise a customer's taste in `dim` numbers trained on purchases; a
customer's own content profile (the words, category and price of what they bought) holds finer
taste that they miss, and it is the only signal for a product nobody has bought yet. On the
synthetic shop's validation slice a plain TF-IDF profile ranked new products far above the
learned vectors (README, "Cold start").

What travels: the basis is a function of the catalogue alone (public to every merchant) and is
shipped in the export beside the tower; the networked coordinator sends it to the merchants too
(an SVD's floating point may differ between machines, and every side must hold the same basis),
as its rows for the shared tokens only (`basis_rows`: the other rows are zero, and which tokens
are shared is integer counting that every node repeats exactly). p_c is computed at the
merchant from its own customers' purchases and stays there, like u.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.content_profiles import profiles
from fedrec.features import ItemFeatures

BASIS = "content_match.basis"  # (n_buckets + 1, k): per token bucket, idf x singular directions; last row padding
WEIGHT = "content_match.weight"  # scalar tensor: w, the weight on the user side


def bucket_tfidf(features: ItemFeatures) -> tuple[sp.csr_matrix, np.ndarray]:
    """Items x token buckets TF-IDF (unit rows) and its idf, per bucket."""
    tok = features.tokens.numpy()
    rows = np.repeat(np.arange(tok.shape[0]), tok.shape[1])
    keep = tok.ravel() != features.n_buckets
    x = sp.csr_matrix(
        (np.ones(int(keep.sum())), (rows[keep], tok.ravel()[keep])), shape=(tok.shape[0], features.n_buckets)
    )  # duplicates sum, as the embedding sum in `content_vectors` does
    idf = np.log(max(x.shape[0], 1) / np.maximum(x.getnnz(axis=0), 1))
    x = sp.csr_matrix(x.multiply(idf[None, :]))
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    return sp.csr_matrix(x.multiply(1.0 / np.maximum(norms, 1e-12)[:, None])), idf


SHARED_MIN = 0.5  # at least this share of products must share a token with another product


def content_basis(features: ItemFeatures, dim: int) -> torch.Tensor | None:
    """The basis of `content_vectors` from a trained catalogue: its TF-IDF matrix's top `dim` right
    singular directions over the tokens that two or more products share, each token bucket's row
    scaled by its idf. A token of one product makes no two products alike, so it is left out.

    None when the catalogue has no content to project: fewer than half its products share a token
    with another. That is a purchase file without metadata, whose titles default to the product
    ids (then only hash collisions are shared: about a fifth of 8,000 ids in 16,384 buckets)."""
    x, idf = bucket_tfidf(features)
    used = _shared_columns(x)
    k = min(dim, x.shape[0] - 1, used.size - 1)
    if k < 1 or (x[:, used].getnnz(axis=1) > 0).mean() < SHARED_MIN:
        return None
    v = top_right_singular_vectors(x[:, used].astype(np.float64), k)
    basis = np.zeros((features.n_buckets + 1, k), dtype=np.float32)
    basis[used] = (idf[used, None] * v).astype(np.float32)
    return torch.from_numpy(basis)


def _shared_columns(x: sp.csr_matrix) -> np.ndarray:
    """The columns (token buckets) of a `bucket_tfidf` matrix that two or more products hold."""
    return np.flatnonzero(x.getnnz(axis=0) >= 2)


def shared_tokens(features: ItemFeatures) -> np.ndarray:
    """The token buckets that two or more products hold (ascending): the only rows of a basis that
    can be non-zero (`content_basis` projects on these alone)."""
    return _shared_columns(bucket_tfidf(features)[0])


def basis_rows(basis: torch.Tensor, features: ItemFeatures) -> np.ndarray:
    """The basis as the networked runtime sends it: its shared tokens' rows, (shared, k)."""
    return basis.numpy()[shared_tokens(features)]


def basis_from_rows(rows: np.ndarray, features: ItemFeatures) -> torch.Tensor:
    """The whole basis back from `basis_rows` (the catalogue's own shared tokens place the rows)."""
    basis = np.zeros((features.n_buckets + 1, rows.shape[1]), dtype=np.float32)
    basis[shared_tokens(features)] = rows
    return torch.from_numpy(basis)


def top_right_singular_vectors(x: sp.csr_matrix, k: int, oversample: int = 32, power_steps: int = 8) -> np.ndarray:
    """(columns, k): x's leading right singular directions by a seeded randomized SVD (Halko,
    Martinsson and Tropp 2011), each signed so its largest entry is positive. Why not ARPACK: its
    answer varied between two calls on the same matrix (a tie among singular values leaves the
    basis free to rotate), and every merchant and the export must hold the same basis."""
    width = min(k + oversample, *x.shape)
    q, _ = np.linalg.qr(x.T @ np.random.default_rng(0).standard_normal((x.shape[0], width)))
    for _ in range(power_steps):  # sharpen the range towards the leading directions
        q, _ = np.linalg.qr(x @ q)
        q, _ = np.linalg.qr(x.T @ q)
    _, _, vt = np.linalg.svd(np.asarray(x @ q), full_matrices=False)
    v = q @ vt[:k].T
    return v * np.sign(v[np.abs(v).argmax(axis=0), np.arange(k)])


def content_vectors(features: ItemFeatures, basis: torch.Tensor) -> torch.Tensor:
    """z for every product of `features`: the idf-weighted sum of its token buckets' directions,
    unit length (zero for a product whose tokens the basis never saw)."""
    z = basis[features.tokens].sum(dim=1)
    return z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)


def customer_profiles(purchases: sp.csr_matrix, z: torch.Tensor) -> torch.Tensor:
    """p for every customer (row of `purchases`, over the products of z): the unit-length sum of
    the z of what they bought (zero for a customer with no purchases)."""
    return torch.from_numpy(profiles(purchases, z.numpy()))


def with_profiles(users: torch.Tensor, purchases: sp.csr_matrix, z: torch.Tensor, weight: float) -> torch.Tensor:
    """[u, w p]: a merchant's user vectors with their content block."""
    return torch.cat([users, weight * customer_profiles(purchases, z).to(users.dtype)], 1)


def with_content(vectors: torch.Tensor, features: ItemFeatures, basis: torch.Tensor) -> torch.Tensor:
    """[v, z]: product vectors with their content block."""
    return torch.cat([vectors, content_vectors(features, basis).to(vectors.dtype)], 1)
