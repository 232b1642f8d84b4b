"""Partitioners keep every purchase exactly once and give the skew they are asked for."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from fedrec.datasets.partition import PartitionConfig, customers, partition
from fedrec.errors import ConfigError


def purchases_as_set(log) -> pl.DataFrame:
    return log.interactions.select("item", "timestamp").sort("item", "timestamp")


@pytest.mark.parametrize("name", ["dirichlet", "quantity"])
def test_every_purchase_is_kept_exactly_once_and_customers_stay_whole(tiny_log, name):
    out = partition(tiny_log, PartitionConfig(name, merchants=7, alpha=0.5, seed=1))
    assert out.interactions.height == tiny_log.interactions.height
    assert purchases_as_set(out).equals(purchases_as_set(tiny_log))
    # each customer (new id = old merchant/user) belongs to exactly one new merchant
    per_user = out.interactions.group_by("user").agg(pl.col("merchant").n_unique())
    assert per_user["merchant"].max() == 1
    assert per_user.height == customers(tiny_log).height
    assert set(out.interactions["merchant"].unique()) <= {f"m{i:03d}" for i in range(7)}
    # seeded: the same config gives the same partition
    again = partition(tiny_log, PartitionConfig(name, merchants=7, alpha=0.5, seed=1))
    assert again.interactions.equals(out.interactions)


def category_concentration(log) -> float:
    """Mean over categories of the largest merchant's share of that category's customers."""
    cust = customers(log).with_columns(pl.col("category").fill_null("(none)"))
    shares = (
        cust.group_by("category", "merchant")
        .len()
        .with_columns(share=pl.col("len") / pl.col("len").sum().over("category"))
    )
    return float(shares.group_by("category").agg(pl.col("share").max())["share"].mean())


def test_dirichlet_alpha_controls_label_skew(tiny_log):
    skewed = category_concentration(partition(tiny_log, PartitionConfig("dirichlet", 10, alpha=0.05, seed=0)))
    even = category_concentration(partition(tiny_log, PartitionConfig("dirichlet", 10, alpha=100.0, seed=0)))
    assert skewed > 0.7  # most of a category's customers at one merchant
    assert even < 0.35  # close to 1/10 per merchant
    assert skewed > even + 0.3


def test_quantity_alpha_controls_size_skew(tiny_log):
    def largest_share(alpha):
        sizes = partition(tiny_log, PartitionConfig("quantity", 20, alpha=alpha, seed=3)).interactions
        per = sizes.group_by("merchant").agg(pl.col("user").n_unique())["user"].to_numpy()
        return per.max() / per.sum()

    assert largest_share(0.1) > 0.3 > 0.1 > largest_share(100.0)


def test_natural_keeps_the_log_and_bad_settings_are_refused(tiny_log):
    assert partition(tiny_log, PartitionConfig()) is tiny_log
    for kwargs, word in (
        ({"name": "random"}, "partition"),
        ({"name": "dirichlet", "merchants": 1}, "between 2 and 1000"),
        ({"name": "quantity", "merchants": 5000}, "between 2 and 1000"),
        ({"name": "dirichlet", "alpha": 0.0}, "alpha"),
    ):
        with pytest.raises(ConfigError, match=word):
            PartitionConfig(**kwargs)


def test_a_thousand_merchants(tiny_log):
    out = partition(tiny_log, PartitionConfig("quantity", 1000, alpha=1.0, seed=0))
    assert out.interactions.height == tiny_log.interactions.height
    assert out.interactions["merchant"].n_unique() <= 1000
    assert np.isin(out.interactions["merchant"].unique().to_numpy(), [f"m{i:03d}" for i in range(1000)]).all()
