"""Partitioners: who is whose customer. Each reassigns whole customers (with every purchase they
made) to merchants, so a customer stays one row of one merchant's user table.

- natural: the log's own merchants (the regional stores of ml100k-temporal, the embedded shop's
  six merchants).
- dirichlet: label skew. For each product category (a customer's most-bought one), merchant shares
  are drawn from Dirichlet(alpha): a small alpha gives each category to one or two merchants, a
  large alpha spreads it evenly (Hsu et al., 2019).
- quantity: size skew. Merchant sizes are drawn from Dirichlet(alpha) over merchants, so a few big
  merchants and a long tail of small ones when alpha is small; tastes stay IID.

Customer ids become "<original merchant>/<customer>", unique across the new merchants; merchants
are named m000, m001, ... Every function is pure and seeded; every purchase is kept exactly once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import polars as pl

from fedrec.config import PARTITIONS
from fedrec.data import PurchaseLog
from fedrec.errors import ConfigError


@dataclass(frozen=True)
class PartitionConfig:
    name: str = "natural"
    merchants: int = 10  # for dirichlet and quantity: 5 to 1,000
    alpha: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in PARTITIONS:
            raise ConfigError(f"partition {self.name!r}: choose one of {', '.join(PARTITIONS)}")
        if self.name != "natural" and not 2 <= self.merchants <= 1000:
            raise ConfigError(f"partition merchants must be between 2 and 1000, got {self.merchants}")
        if self.alpha <= 0:
            raise ConfigError(f"partition alpha must be > 0, got {self.alpha}")


def customers(log: PurchaseLog) -> pl.DataFrame:
    """One row per customer: its new id and its most-bought category (null when unknown)."""
    inter = log.interactions.select("merchant", "user", "item")
    if "category" in log.items.columns:
        inter = inter.join(log.items.select("item", "category"), on="item", how="left")
    else:
        inter = inter.with_columns(category=pl.lit(None, dtype=pl.String))
    top = (
        inter.group_by("merchant", "user", "category")
        .len()
        .sort("merchant", "user", "len", "category", descending=[False, False, True, False], nulls_last=True)
        .group_by("merchant", "user", maintain_order=True)
        .first()
    )
    return top.select("merchant", "user", "category").sort("merchant", "user")


def assign(log: PurchaseLog, owner: pl.DataFrame) -> PurchaseLog:
    """Apply a (merchant, user) -> new merchant table to every purchase (vectorised join)."""
    inter = log.interactions.join(owner.rename({"new_merchant": "_to"}), on=["merchant", "user"], how="inner")
    if inter.height != log.interactions.height:
        raise ValueError("partition lost purchases: every customer needs a new merchant")
    inter = inter.with_columns(
        user=pl.concat_str([pl.col("merchant"), pl.col("user")], separator="/"), merchant=pl.col("_to")
    ).drop("_to")
    return replace(log, interactions=inter.select(log.interactions.columns))


def _names(k: int) -> np.ndarray:
    return np.array([f"m{i:03d}" for i in range(k)])


def dirichlet_partition(log: PurchaseLog, n_merchants: int, alpha: float, seed: int) -> PurchaseLog:
    cust = customers(log).with_columns(pl.col("category").fill_null("(none)"))
    rng = np.random.default_rng(seed)
    cats, inverse = np.unique(cust["category"].to_numpy(), return_inverse=True)
    shares = rng.dirichlet(np.full(n_merchants, alpha), size=len(cats))  # [categories, merchants]
    # Inverse-CDF draw per customer from its category's shares (vectorised).
    cdf = np.cumsum(shares, axis=1)
    pick = (rng.random(len(cust))[:, None] > cdf[inverse]).sum(axis=1).clip(max=n_merchants - 1)
    owner = cust.select("merchant", "user").with_columns(new_merchant=pl.Series(_names(n_merchants)[pick]))
    return assign(log, owner)


def quantity_partition(log: PurchaseLog, n_merchants: int, alpha: float, seed: int) -> PurchaseLog:
    cust = customers(log)
    rng = np.random.default_rng(seed)
    sizes = rng.dirichlet(np.full(n_merchants, alpha))
    pick = rng.choice(n_merchants, size=cust.height, p=sizes)
    owner = cust.select("merchant", "user").with_columns(new_merchant=pl.Series(_names(n_merchants)[pick]))
    return assign(log, owner)


def partition(log: PurchaseLog, cfg: PartitionConfig) -> PurchaseLog:
    if cfg.name == "natural":
        return log
    if cfg.name == "dirichlet":
        return dirichlet_partition(log, cfg.merchants, cfg.alpha, cfg.seed)
    return quantity_partition(log, cfg.merchants, cfg.alpha, cfg.seed)
