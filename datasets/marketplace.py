"""A generated marketplace at scale: up to a million products and a thousand merchants.

The embedded shop's structure (datasets/synthetic.py: categories, titles, prices, power-law
popularity, customers' category taste, style and price preference, baskets over time, non-IID
merchants), grown to a marketplace with quantity skew: merchant sizes follow a power law, so a
few big merchants and a long tail of small shops.

The embedded generator scores every product of a category for every purchase, which is
O(purchases x catalogue). Here each purchase draws `candidates` products from its category in
proportion to popularity, then picks one by Gumbel-max on the rest of the utility (style, price,
recency): sampling-importance-resampling of the same choice model, O(purchases x candidates).
Generated at first use from a seed, cached atomically like the embedded log.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from fedrec.atomic import write_with
from fedrec.data import PurchaseLog
from fedrec.datasets.synthetic import (
    CATEGORIES,
    _catalogue,
    cached_log,
    event_categories,
    item_logits,
    purchase_events,
    purchases_frame,
    shoppers,
)

GENERATOR_VERSION = 1
CHUNK = 200_000  # purchases scored at once: bounds memory at chunk x candidates x style_dim


@dataclass(frozen=True)
class MarketplaceConfig:
    n_products: int = 1_000_000
    n_merchants: int = 1000
    n_customers: int = 500_000  # about 10 purchase lines each: ~5M purchases
    min_customers: int = 20  # the smallest shop
    size_exponent: float = 1.0  # merchant m's share of customers ~ (m + 1)^-a: quantity skew
    mean_baskets: float = 5.0
    mean_basket_size: float = 2.2
    candidates: int = 32
    style_dim: int = 8
    style_weight: float = 3.0
    popularity_exponent: float = 0.7
    days: int = 365
    seed: int = 20241201
    complement_share: float = 0.0  # a purchase after the first basket that is a complement of an earlier one
    family_size: int = 3  # products per complement family


def merchant_sizes(cfg: MarketplaceConfig, rng: np.random.Generator) -> np.ndarray:
    """Customers per merchant: `min_customers` each, the rest in power-law shares."""
    spare = cfg.n_customers - cfg.min_customers * cfg.n_merchants
    if spare < 0:
        raise ValueError(f"n_customers {cfg.n_customers} < n_merchants x min_customers")
    share = (np.arange(cfg.n_merchants) + 1.0) ** -cfg.size_exponent
    return cfg.min_customers + rng.multinomial(spare, share / share.sum())


def generate(cfg: MarketplaceConfig | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return (purchases, products); same seed, same frames."""
    cfg = cfg or MarketplaceConfig()
    rng = np.random.default_rng(cfg.seed)
    products, cat, log_pop = _catalogue(cfg, rng)  # duck-typed: n_products, popularity_exponent, days
    n_cat = len(CATEGORIES)
    price = products["price"].to_numpy()
    catalogue = {
        "release": products["release_day"].to_numpy(),
        "style": (rng.normal(0, 1, (cfg.n_products, cfg.style_dim)) / np.sqrt(cfg.style_dim)).astype(np.float32),
        "log_price": np.log(price),
    }
    cust_m = np.repeat(np.arange(cfg.n_merchants), merchant_sizes(cfg, rng))
    taste, style, price_pref = shoppers(cust_m, cfg.n_merchants, n_cat, cfg.style_dim, rng)
    style = style.astype(np.float32)
    e_cust, e_day = purchase_events(len(cust_m), cfg.mean_baskets, cfg.mean_basket_size, cfg.days, rng)
    e_cat = np.concatenate([event_categories(taste, e_cust[s : s + CHUNK], rng) for s in range(0, len(e_cust), CHUNK)])

    e_item = np.full(len(e_cust), -1, dtype=np.int64)
    for c in range(n_cat):
        its = np.flatnonzero(cat == c)
        events = np.flatnonzero(e_cat == c)
        if len(its) == 0 or len(events) == 0:
            continue
        cdf = np.cumsum(np.exp(log_pop[its] - log_pop[its].max()))
        centre = np.log(np.median(price[its]))
        for s in range(0, len(events), CHUNK):
            ev = events[s : s + CHUNK]
            draws = np.searchsorted(cdf, rng.random((len(ev), cfg.candidates)) * cdf[-1], side="right")
            cand = its[np.minimum(draws, len(its) - 1)]
            logits = item_logits(
                cand, e_day[ev], style[e_cust[ev]], price_pref[e_cust[ev]], catalogue, centre, cfg.style_weight
            )
            gumbel = -np.log(-np.log(rng.random(logits.shape)))
            best = np.argmax(logits + gumbel, axis=1)
            ok = np.isfinite(logits[np.arange(len(ev)), best])  # no candidate released yet: no purchase
            e_item[ev[ok]] = cand[ok, best[ok]]
    if cfg.complement_share > 0:
        e_item = with_complements(e_cust, e_day, e_item, catalogue["release"], cfg, rng)
    keep = e_item >= 0
    names = np.array([f"m{i:04d}" for i in range(cfg.n_merchants)])
    purchases = purchases_frame(
        names[cust_m[e_cust[keep]]], e_cust[keep], products["item"].to_numpy(), e_item[keep], e_day[keep]
    )
    return purchases, products.drop("release_day")


def with_complements(
    e_cust: np.ndarray,
    e_day: np.ndarray,
    e_item: np.ndarray,
    release: np.ndarray,
    cfg: MarketplaceConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """Purchases with a share of each customer's later ones replaced by complements of earlier ones.

    Products fall into random families of `family_size` (a printer, its ink, its paper). With
    probability `complement_share`, a purchase after a customer's first basket becomes another
    member, drawn at random, of the family of one of their earlier purchases, when that member is
    released by then. That is product-to-product structure, which item-kNN and EASE read directly
    and a low-rank model only through its factors (issue 9's held-back shop favoured item-kNN).
    Events must come grouped by customer, in time order within each (`purchase_events` does).
    """
    if cfg.family_size < 2:
        raise ValueError(f"family_size {cfg.family_size}: a complement family needs at least 2 products")
    n = len(release)
    order = rng.permutation(n)  # family f holds the products order[f * size : (f + 1) * size]
    slot = np.empty(n, np.int64)
    slot[order] = np.arange(n)
    idx = np.arange(len(e_cust))
    new_customer = np.r_[True, e_cust[1:] != e_cust[:-1]]
    new_basket = new_customer | np.r_[True, e_day[1:] != e_day[:-1]]
    first_of_customer = np.maximum.accumulate(np.where(new_customer, idx, 0))
    first_of_basket = np.maximum.accumulate(np.where(new_basket, idx, 0))
    earlier = first_of_basket - first_of_customer  # the customer's purchases in earlier baskets
    ref = e_item[first_of_customer + (rng.random(len(idx)) * earlier).astype(np.int64)]
    at = slot[np.maximum(ref, 0)]
    mate_slot = (
        at
        - at % cfg.family_size
        + (at % cfg.family_size + rng.integers(1, cfg.family_size, len(idx))) % cfg.family_size
    )
    mate = order[np.minimum(mate_slot, n - 1)]
    swap = (earlier > 0) & (ref >= 0) & (e_item >= 0) & (mate_slot < n) & (release[mate] <= e_day)
    swap &= rng.random(len(idx)) < cfg.complement_share
    return np.where(swap, mate, e_item)


def load(cfg: MarketplaceConfig | None = None) -> PurchaseLog:
    """The generated marketplace, cached like the embedded log (`synthetic.cached_log`)."""
    cfg = cfg or MarketplaceConfig()
    source = f"generated marketplace, generator v{GENERATOR_VERSION} (datasets/marketplace.py): {cfg}"
    return cached_log("marketplace", cfg, GENERATOR_VERSION, lambda: generate(cfg), source)


# A shop of the shape issue 9 holds back (about 600 customers, thousands of products, each sold a
# few times, no product metadata, 8 merchants), for checking defaults on data nothing was tuned
# on: `make evaluate-new-shop`. Its purchases come from the marketplace's choice model; nothing
# about them reaches a model but the purchase file.
NEW_SHOP = MarketplaceConfig(
    n_products=16_000, n_merchants=8, n_customers=600, min_customers=30, mean_baskets=20.0, popularity_exponent=0.5,
    seed=1,
)  # fmt: skip

# The same kind of shop with a catalogue past the full softmax (`local.full_softmax_max_items`,
# 20,000) and the co-purchase term (16,000) but within the exact ials's one id row per product
# (2 x `model.id_rows`, 32,768): about 24,000 products sold to 2,000 customers. There the file
# default's softmax candidates train on sampled softmax and its exact ials candidates still run
# (`make probe-file-default SOURCE=large-shop`).
LARGE_SHOP = MarketplaceConfig(
    n_products=40_000, n_merchants=8, n_customers=2_000, min_customers=30, mean_baskets=20.0,
    popularity_exponent=0.5, seed=2,
)  # fmt: skip


# A shop whose customers also buy complements of what they bought before (half of their later
# purchases, families of 3 products), on a 4,000-product catalogue: where EASE leads ALS, as
# item-kNN led on issue 9's held-back shop (`make probe-file-default SOURCE=complement-shop`).
COMPLEMENT_SHOP = MarketplaceConfig(
    n_products=4_000, n_merchants=8, n_customers=600, min_customers=30, mean_baskets=20.0,
    popularity_exponent=0.5, complement_share=0.5, family_size=3, seed=3,
)  # fmt: skip


def write_purchase_file(path: str | Path, cfg: MarketplaceConfig = NEW_SHOP) -> int:
    """Write the generated purchases as a plain purchase file (merchant, user, item, timestamp: no
    product metadata), atomically; returns the number of rows."""
    purchases, _ = generate(cfg)
    rows = purchases.select("merchant", "user", "item", "timestamp")
    write_with(Path(path), lambda tmp: rows.write_csv(tmp))
    return rows.height
