"""In-memory data model: a raw purchase log, and its per-merchant split into sparse matrices.

A merchant's matrices are indexed by that merchant's own user rows and the shared catalogue's
item columns; only the catalogue is common to everyone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import scipy.sparse as sp

INTERACTION_COLUMNS = ("merchant", "user", "item", "timestamp")
ITEM_COLUMNS = ("item", "title", "category", "price", "tags")


@dataclass(frozen=True)
class PurchaseLog:
    """Positive interactions (already filtered to purchases) plus catalogue metadata.

    interactions: merchant (str), user (str), item (str), timestamp (i64, unix seconds).
    items: item (str), title (str), category (str|null), price (f64|null),
    tags (str|null: extra space-separated content tokens such as genres).
    """

    name: str
    interactions: pl.DataFrame
    items: pl.DataFrame
    source: str = ""


@dataclass(frozen=True)
class MerchantData:
    """One merchant's private data. Never leaves the merchant's process."""

    name: str
    user_ids: np.ndarray
    train: sp.csr_matrix  # what local training sees (train minus the validation slice)
    val: sp.csr_matrix  # last items of each user's train part: early stopping only
    test: sp.csr_matrix  # held-out future purchases
    # Only for the pooled (centralized) client: each customer's original merchant, so the pooled
    # model can keep one item bias per merchant, as the federated one does.
    user_groups: np.ndarray | None = None

    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    @property
    def full_train(self) -> sp.csr_matrix:
        """Everything before the test cut-off: excluded from rankings at test time."""
        return (self.train + self.val).tocsr()

    def with_validation_in_train(self) -> MerchantData:
        """Train grown by the validation slice, which is then empty: the refit's data."""
        empty = sp.csr_matrix(self.val.shape, dtype=self.val.dtype)
        return dataclasses.replace(self, train=self.full_train, val=empty)


@dataclass(frozen=True)
class FederatedDataset:
    name: str
    items: pl.DataFrame  # catalogue metadata, row i = item index i: the products with purchases
    merchants: list[MerchantData]
    protocol: dict = field(default_factory=dict)
    # Catalogue products nobody has bought yet. They take no part in training or evaluation, but
    # the export embeds them from their content, after `items`, so they can be recommended.
    new_items: pl.DataFrame | None = None

    @property
    def n_items(self) -> int:
        return self.items.height

    @property
    def item_ids(self) -> np.ndarray:
        return self.items["item"].to_numpy()

    def merchant(self, name: str) -> MerchantData:
        for m in self.merchants:
            if m.name == name:
                return m
        raise KeyError(name)

    def summary(self) -> dict:
        return {
            "dataset": self.name,
            "items": self.n_items,
            "new_items": 0 if self.new_items is None else self.new_items.height,
            "merchants": {
                m.name: {
                    "users": m.n_users,
                    "train": int(m.train.nnz),
                    "val": int(m.val.nnz),
                    "test": int(m.test.nnz),
                }
                for m in self.merchants
            },
        }


def pooled(dataset: FederatedDataset) -> MerchantData:
    """All merchants stacked as one: the centralized upper bound federation gives up."""
    ms = dataset.merchants
    return MerchantData(
        name="pooled",
        user_ids=np.concatenate([m.name + "/" + m.user_ids.astype(str) for m in ms]),
        train=sp.vstack([m.train for m in ms]).tocsr(),
        val=sp.vstack([m.val for m in ms]).tocsr(),
        test=sp.vstack([m.test for m in ms]).tocsr(),
        user_groups=np.repeat(np.arange(len(ms)), [m.n_users for m in ms]),
    )
