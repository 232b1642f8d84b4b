"""The generated complement structure: a share of each customer's later purchases become another
member of the family of one of their earlier purchases; first baskets are never touched."""

import dataclasses

import numpy as np
import pytest

from fedrec.datasets.marketplace import NEW_SHOP, MarketplaceConfig, generate, with_complements


def _events(rng: np.random.Generator, customers: int = 400, n_items: int = 300):
    """Events grouped by customer, in time order within each, as `purchase_events` gives them."""
    per = rng.integers(1, 12, customers)
    cust = np.repeat(np.arange(customers), per)
    day = np.concatenate([np.sort(rng.integers(0, 6, k)) for k in per]).astype(float)
    return cust, day, rng.integers(0, n_items, len(cust))


def test_a_swapped_purchase_is_a_family_mate_of_an_earlier_basket_of_the_same_customer():
    cust, day, item = _events(np.random.default_rng(0))
    cfg = MarketplaceConfig(complement_share=1.0, family_size=3)
    out = with_complements(cust, day, item, np.zeros(300), cfg, np.random.default_rng(5))
    order = np.random.default_rng(5).permutation(300)  # the function's first draw: the families
    family = np.empty(300, np.int64)
    family[order] = np.arange(300) // 3
    first_day = {c: day[cust == c].min() for c in np.unique(cust)}
    swapped = np.flatnonzero(out != item)
    assert len(swapped) > 0.8 * np.sum(day > np.array([first_day[c] for c in cust]))
    for e in swapped:
        assert day[e] > first_day[cust[e]]  # never in a first basket
        earlier = item[(cust == cust[e]) & (day < day[e])]
        assert family[out[e]] in set(family[earlier])
    first = np.array([day[e] == first_day[cust[e]] for e in range(len(cust))])
    assert np.array_equal(out[first], item[first])


def test_the_share_is_what_the_config_asks_and_unreleased_mates_are_not_sold():
    cust, day, item = _events(np.random.default_rng(1), customers=3_000)
    eligible = day > np.array([day[cust == c].min() for c in cust])
    cfg = MarketplaceConfig(complement_share=0.4, family_size=2)
    out = with_complements(cust, day, item, np.zeros(300), cfg, np.random.default_rng(2))
    share = float(np.mean(out[eligible] != item[eligible]))
    assert 0.37 < share < 0.43  # about 15,000 eligible purchases: a standard error of 0.004
    late = np.full(300, 100.0)  # nothing released within the log's days
    assert np.array_equal(with_complements(cust, day, item, late, cfg, np.random.default_rng(2)), item)
    with pytest.raises(ValueError, match="family_size 1"):
        with_complements(
            cust, day, item, np.zeros(300), dataclasses.replace(cfg, family_size=1), np.random.default_rng(0)
        )


def test_complements_change_items_only_after_every_other_draw():
    """The swap is the generator's last draw: the same customers buy on the same days, some of
    them other products, so a shop without complements is the one it was before they existed."""
    small = dataclasses.replace(NEW_SHOP, n_products=2_000, n_customers=300, mean_baskets=5.0)
    base, _ = generate(small)
    paired, _ = generate(dataclasses.replace(small, complement_share=0.5))
    baskets = lambda log: set(log.select("user", "timestamp").unique().iter_rows())  # noqa: E731
    assert baskets(base) == baskets(paired)
    changed = 1 - len(set(base.iter_rows()) & set(paired.iter_rows())) / base.height
    assert 0.2 < changed < 0.5  # half of the purchases after each first basket
