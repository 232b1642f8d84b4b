"""The temporal evaluation protocol (`ml100k-temporal`), applied to any purchase log.

- Items without positives drop out of training and evaluation (`new_items` keeps them for the
  export, which embeds them from their content); users with fewer than `min_positives` positives drop out.
- Per user, positives sorted by time (ties by item id); the last ceil(test_fraction) are test.
- Validation is carved from the train part only (its last ceil(val_fraction)), so early stopping
  never sees a test purchase.
- Every user keeps at least one train purchase (and two before any goes to validation): a large
  fraction is capped there rather than leave a user, or a whole merchant, nothing to train on. At
  the protocol's fractions (0.2 and 0.1, at least 5 positives) the cap never binds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp

from fedrec.data import FederatedDataset, MerchantData, PurchaseLog
from fedrec.errors import DataError


@dataclass(frozen=True)
class SplitConfig:
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    min_positives: int = 5


def _ceil_count(n: pl.Expr, fraction: float) -> pl.Expr:
    # Round before ceil: 0.2 * 15 is 3.0000000000000004 in floating point, which must stay 3.
    return (n.cast(pl.Float64) * fraction).round(9).ceil().cast(pl.Int64)


def catalogue_order(item_ids: pl.Series) -> pl.Series:
    """Items sorted by id, numerically when every id is an integer (so ties break by item id)."""
    as_int = item_ids.cast(pl.Int64, strict=False)
    if as_int.null_count() == 0:
        return item_ids.gather(as_int.arg_sort())
    return item_ids.sort()


def temporal_split(log: PurchaseLog, cfg: SplitConfig | None = None) -> FederatedDataset:
    """Split a purchase log into per-merchant train/val/test CSR matrices (vectorised)."""
    cfg = cfg or SplitConfig()
    inter = (
        log.interactions.select("merchant", "user", "item", "timestamp")
        # A repeat purchase is one positive, dated by its first occurrence.
        .group_by("merchant", "user", "item")
        .agg(pl.col("timestamp").min())
    )
    items_with_pos = catalogue_order(inter["item"].unique())
    items = (
        pl.DataFrame({"item": items_with_pos})
        .join(log.items, on="item", how="left", maintain_order="left")
        .with_row_index("item_index")
    )
    inter = inter.join(items.select("item", "item_index"), on="item")

    counted = inter.sort("merchant", "user", "timestamp", "item_index").with_columns(
        rank=pl.col("item_index").cum_count().over("merchant", "user") - 1,
        n=pl.len().over("merchant", "user"),
    )
    inter = counted.filter(pl.col("n") >= cfg.min_positives)
    if inter.height == 0:
        raise DataError(f"{log.name}: no user has at least {cfg.min_positives} purchases; nothing to train or evaluate")
    # What the protocol leaves out, said rather than silent: a merchant whose every customer is
    # below min_positives takes no part at all (no update, no export of its own).
    customers_below = counted.select("merchant", "user").n_unique() - inter.select("merchant", "user").n_unique()
    left_out = sorted(set(counted["merchant"].unique().to_list()) - set(inter["merchant"].unique().to_list()))
    n_test = pl.min_horizontal(_ceil_count(pl.col("n"), cfg.test_fraction), pl.col("n") - 1)
    n_train = pl.col("n") - n_test
    n_val = (
        pl.when(n_train >= 2).then(pl.min_horizontal(_ceil_count(n_train, cfg.val_fraction), n_train - 1)).otherwise(0)
    )
    inter = inter.with_columns(
        part=pl.when(pl.col("rank") >= n_train)
        .then(pl.lit("test"))
        .when(pl.col("rank") >= n_train - n_val)
        .then(pl.lit("val"))
        .otherwise(pl.lit("train"))
    )

    n_items = items.height
    merchants: list[MerchantData] = []
    for (name,), group in inter.partition_by("merchant", as_dict=True, maintain_order=True).items():
        users = group["user"].unique().sort()
        group = group.join(pl.DataFrame({"user": users}).with_row_index("user_index"), on="user")
        mats = {}
        for part in ("train", "val", "test"):
            g = group.filter(pl.col("part") == part)
            mats[part] = sp.csr_matrix(
                (
                    np.ones(g.height, dtype=np.float32),
                    (g["user_index"].to_numpy(), g["item_index"].to_numpy()),
                ),
                shape=(users.len(), n_items),
            )
        merchants.append(MerchantData(name=str(name), user_ids=users.to_numpy(), **mats))
    merchants.sort(key=lambda m: m.name)
    unsold = log.items.join(items.select("item"), on="item", how="anti")
    new_items = pl.DataFrame({"item": catalogue_order(unsold["item"])}).join(
        unsold, on="item", how="left", maintain_order="left"
    )
    return FederatedDataset(
        name=log.name,
        items=items.drop("item_index"),
        new_items=new_items.select(items.drop("item_index").columns),
        merchants=merchants,
        protocol={
            "name": "temporal",
            "test_fraction": cfg.test_fraction,
            "val_fraction": cfg.val_fraction,
            "min_positives": cfg.min_positives,
            "customers_below_min_positives": customers_below,
            "merchants_left_out": left_out,
            "source": log.source,
        },
    )


def cold_start_split(dataset: FederatedDataset, period: str = "test") -> tuple[FederatedDataset, np.ndarray]:
    """The products first sold after every buyer's cut-off (all their purchases are in test), and
    the dataset without them: what training would have seen before they existed.

    `period="validation"`: the same one slice earlier, for choosing settings: the products whose
    every purchase before the test cut-off is in the validation slice. Products sold only in test
    do not exist yet then, so they leave the returned dataset too (test's purchases are not read).

    Returns (dataset over the other products, indices of the new products in `dataset.items`).
    """
    if period not in ("test", "validation"):
        raise ValueError(f"cold_start_split: period must be test or validation, got {period!r}")
    if period == "test":
        before = sum(np.asarray(m.full_train.sum(axis=0)).ravel() for m in dataset.merchants)
        after = sum(np.asarray(m.test.sum(axis=0)).ravel() for m in dataset.merchants)
    else:
        before = sum(np.asarray(m.train.sum(axis=0)).ravel() for m in dataset.merchants)
        after = sum(np.asarray(m.val.sum(axis=0)).ravel() for m in dataset.merchants)
    new = (before == 0) & (after > 0)
    known = np.flatnonzero(before > 0) if period == "validation" else np.flatnonzero(~new)
    merchants = [
        MerchantData(m.name, m.user_ids, m.train[:, known], m.val[:, known], m.test[:, known])
        for m in dataset.merchants
    ]
    items = dataset.items[known.tolist()]
    return FederatedDataset(dataset.name, items, merchants, dataset.protocol), np.flatnonzero(new)
