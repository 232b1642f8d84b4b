"""Item content features: hashed tokens of title/description, category, tags and price bucket.

Hashing (not a vocabulary) keeps the item tower's shape fixed and identical at every merchant,
so towers can be averaged without agreeing on a vocabulary first. Stable crc32, never Python's
salted `hash()`.
"""

from __future__ import annotations

import threading
import weakref
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch

PRICE_RATIO = 1.5


@dataclass(frozen=True)
class ItemFeatures:
    """Padded token-bucket matrix: row i holds item i's hashed feature ids, padding = n_buckets."""

    tokens: torch.Tensor  # int64 [n_items, max_tokens]
    n_buckets: int

    @property
    def n_items(self) -> int:
        return self.tokens.shape[0]


T = TypeVar("T")
_derived: dict[tuple[int, object], object] = {}
_derived_lock = threading.Lock()


def derived(features: ItemFeatures, key: object, make: Callable[[], T]) -> T:
    """`make()` computed once per catalogue and key, and dropped with the catalogue: every local
    update of every round asks for the same forms of it (its used token rows, a copy on a GPU)."""
    slot = (id(features), key)
    with _derived_lock:
        if slot in _derived:
            return _derived[slot]  # type: ignore[return-value]
    value = make()  # outside the lock: two threads may both compute it, and keep the same value
    with _derived_lock:
        if slot not in _derived:
            weakref.finalize(features, _derived.pop, slot, None)
            _derived[slot] = value
        return _derived[slot]  # type: ignore[return-value]


def features_on(features: ItemFeatures, device: torch.device) -> ItemFeatures:
    """The catalogue's tokens on `device` (copied there once, not at every local update)."""
    if device.type == "cpu":
        return features
    return derived(
        features, ("device", str(device)), lambda: ItemFeatures(features.tokens.to(device), features.n_buckets)
    )


def item_tokens(items: pl.DataFrame) -> pl.DataFrame:
    """One row per (item_index, token). Token kinds are prefixed so 'red' the word and the tag differ."""
    df = items.with_row_index("item_index")
    parts = []
    text = pl.concat_str(
        [pl.col(c).fill_null("") for c in ("title", "description") if c in df.columns],
        separator=" ",
    )
    parts.append(
        df.select("item_index", token=text.str.to_lowercase().str.extract_all(r"[a-z0-9]+"))
        .explode("token")
        .with_columns(("w:" + pl.col("token")).alias("token"))
    )
    if "category" in df.columns:
        parts.append(df.select("item_index", token=("c:" + pl.col("category").str.to_lowercase())))
    if "tags" in df.columns:
        parts.append(
            df.select("item_index", token=pl.col("tags").str.to_lowercase().str.split(" "))
            .explode("token")
            .filter(pl.col("token") != "")
            .with_columns(("t:" + pl.col("token")).alias("token"))
        )
    if "price" in df.columns:
        # Absolute log-scale buckets (x1.5 apart), not ones fitted to this catalogue's price range:
        # a product added later gets the same token as an old one at the same price.
        bucket = (pl.col("price").clip(lower_bound=0).log1p() / np.log(PRICE_RATIO)).floor().cast(pl.Int64)
        parts.append(df.select("item_index", token=("p:" + bucket.cast(pl.String))))
    return pl.concat(parts).drop_nulls().unique(maintain_order=True)


def build_item_features(items: pl.DataFrame, n_buckets: int) -> ItemFeatures:
    tok = item_tokens(items)
    vocab = tok["token"].unique()
    # One crc32 per distinct token (vocabulary size), not per interaction.
    buckets = np.fromiter(
        (zlib.crc32(t.encode("utf-8")) % n_buckets for t in vocab.to_list()),
        dtype=np.int64,
        count=vocab.len(),
    )
    tok = tok.join(pl.DataFrame({"token": vocab, "bucket": buckets}), on="token")
    tok = tok.sort("item_index").with_columns(pos=pl.col("bucket").cum_count().over("item_index") - 1)
    n_items = items.height
    width = max(int(tok["pos"].max() or 0) + 1, 1)
    mat = np.full((n_items, width), n_buckets, dtype=np.int64)
    mat[tok["item_index"].to_numpy(), tok["pos"].to_numpy()] = tok["bucket"].to_numpy()
    return ItemFeatures(tokens=torch.from_numpy(mat), n_buckets=n_buckets)


def tfidf_rows(tokens: torch.Tensor, padding: int) -> sp.csr_matrix:
    """Items x used-token TF-IDF matrix with unit rows: the content similarity of products (a
    token twice in one product counts once)."""
    tok = tokens.numpy()
    rows = np.repeat(np.arange(tok.shape[0]), tok.shape[1])
    keep = tok.ravel() != padding
    used, cols = np.unique(tok.ravel()[keep], return_inverse=True)
    x = sp.csr_matrix((np.ones(cols.size), (rows[keep], cols)), shape=(tok.shape[0], used.size))
    x.data[:] = 1.0
    x = sp.csr_matrix(x.multiply(np.log(x.shape[0] / np.maximum(x.getnnz(axis=0), 1))[None, :]))
    norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    return sp.csr_matrix(x.multiply(1.0 / np.maximum(norms, 1e-12)[:, None]))
