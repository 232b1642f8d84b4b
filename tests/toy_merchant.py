"""A tiny merchant for unit tests of the local update: random purchases over a small catalogue."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.features import ItemFeatures


def toy_merchant(
    n_users: int = 40, n_items: int = 300, per_user: int = 6, tokens: int = 64, width: int = 5, buckets: int = 64,
    seed: int = 0,
) -> tuple[sp.csr_matrix, ItemFeatures]:  # fmt: skip
    """`per_user` random purchases per customer (a repeat counts once) and `width` random content
    tokens per product, drawn from the first `tokens` of `buckets` hash buckets."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(n_users), per_user)
    cols = rng.integers(0, n_items, len(rows))
    train = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n_users, n_items))
    train.data[:] = 1.0
    features = ItemFeatures(torch.from_numpy(rng.integers(0, tokens, (n_items, width))), buckets)
    return train, features
