"""A deterministic synthetic e-commerce purchase log: the offline default dataset.

It is synthetic (no real customer is in it) but shaped like a shop federation:
- one shared catalogue of ~3,000 products in 16 categories, with titles, descriptions, prices
  (log-normal around a category median) and release days;
- power-law product popularity within each category;
- one large merchant and five small ones whose customers favour different categories and
  price levels (non-IID across merchants);
- each customer has a few favourite categories and a latent style; baskets arrive over time,
  and recently released products are favoured, so a temporal split is meaningful.
Generated at first use from a seed, written atomically, identical on every machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

from fedrec.atomic import write_with
from fedrec.data import PurchaseLog
from fedrec.datasets import cache_dir

GENERATOR_VERSION = 1
DAY = 86_400
START = 1_704_067_200  # 2024-01-01 UTC

CATEGORIES: dict[str, tuple[list[str], float]] = {
    "Electronics": (["headphones", "charger", "speaker", "cable", "mouse", "keyboard", "webcam", "power bank"], 45.0),
    "Kitchen": (["pan", "knife", "kettle", "blender", "mug", "cutting board", "toaster", "spatula"], 30.0),
    "Books": (
        ["novel", "cookbook", "travel guide", "biography", "comic", "atlas", "poetry collection", "thriller"],
        15.0,
    ),
    "Toys": (["puzzle", "building blocks", "doll", "toy car", "board game", "plush bear", "kite", "yo-yo"], 20.0),
    "Garden": (["hose", "planter", "seed kit", "pruner", "watering can", "gloves", "lantern", "bird feeder"], 25.0),
    "Sports": (
        ["yoga mat", "dumbbell", "water bottle", "running socks", "jump rope", "tennis balls", "helmet", "backpack"],
        30.0,
    ),
    "Beauty": (["lipstick", "face cream", "shampoo", "perfume", "nail polish", "serum", "hair brush", "soap"], 18.0),
    "Pets": (
        ["dog leash", "cat toy", "pet bed", "chew bone", "litter box", "aquarium filter", "bird seed", "collar"],
        22.0,
    ),
    "Fashion": (["t-shirt", "scarf", "sneakers", "belt", "hat", "jacket", "sunglasses", "wallet"], 35.0),
    "Home Decor": (["candle", "vase", "cushion", "picture frame", "rug", "mirror", "clock", "throw blanket"], 28.0),
    "Grocery": (["coffee beans", "green tea", "olive oil", "pasta", "chocolate", "honey", "granola", "spice mix"], 8.0),
    "Office": (
        ["notebook", "pen set", "stapler", "desk lamp", "planner", "folder", "sticky notes", "calculator"],
        12.0,
    ),
    "Baby": (["bottle", "pacifier", "bib", "stroller fan", "teether", "baby blanket", "rattle", "diaper bag"], 20.0),
    "Automotive": (
        [
            "phone mount",
            "seat cover",
            "air freshener",
            "wiper blades",
            "tyre gauge",
            "dash cam",
            "car charger",
            "floor mat",
        ],
        25.0,
    ),
    "Outdoor": (
        ["tent", "sleeping bag", "camping stove", "headlamp", "compass", "hammock", "cooler", "trekking poles"],
        50.0,
    ),
    "Health": (
        [
            "vitamins",
            "thermometer",
            "first aid kit",
            "massage ball",
            "heating pad",
            "pill box",
            "hand sanitizer",
            "face masks",
        ],
        15.0,
    ),
}
ADJECTIVES = [
    "classic",
    "premium",
    "compact",
    "eco",
    "deluxe",
    "smart",
    "vintage",
    "portable",
    "essential",
    "pro",
    "mini",
    "organic",
]
COLOURS = ["black", "white", "red", "blue", "green", "grey", "oak", "steel", "pink", "navy", "sand", "olive"]
BRANDS = [
    "Acme",
    "Nordic",
    "Zenith",
    "Luma",
    "Orbit",
    "Pioneer",
    "Kestrel",
    "Maple",
    "Vega",
    "Tundra",
    "Cobalt",
    "Juniper",
]


@dataclass(frozen=True)
class SyntheticConfig:
    n_products: int = 3000
    # One large merchant and five small ones.
    merchants: tuple[tuple[str, int], ...] = (
        ("northwind", 2400),
        ("bluebird", 450),
        ("cedar", 380),
        ("dune", 300),
        ("ember", 250),
        ("fjord", 200),
    )
    mean_baskets: float = 5.0
    mean_basket_size: float = 2.2
    style_dim: int = 8
    style_weight: float = 3.0
    popularity_exponent: float = 0.7
    days: int = 365
    seed: int = 20240101


def _catalogue(cfg: SyntheticConfig, rng: np.random.Generator) -> tuple[pl.DataFrame, np.ndarray, np.ndarray]:
    names = list(CATEGORIES)
    cat_share = rng.dirichlet(np.full(len(names), 4.0))
    cat = rng.choice(len(names), size=cfg.n_products, p=cat_share)
    noun_idx = rng.integers(0, 8, cfg.n_products)
    adj = rng.integers(0, len(ADJECTIVES), cfg.n_products)
    col = rng.integers(0, len(COLOURS), cfg.n_products)
    brand = rng.integers(0, len(BRANDS), cfg.n_products)
    nouns = np.array([[n for n in CATEGORIES[c][0]] for c in names])
    medians = np.array([CATEGORIES[c][1] for c in names])
    brand_level = rng.normal(0, 0.3, len(BRANDS))
    price = np.round(medians[cat] * np.exp(brand_level[brand] + rng.normal(0, 0.45, cfg.n_products)), 2)
    release = rng.integers(-240, cfg.days - 30, cfg.n_products)
    noun = nouns[cat, noun_idx]
    a, c, b = np.array(ADJECTIVES)[adj], np.array(COLOURS)[col], np.array(BRANDS)[brand]
    df = pl.DataFrame(
        {
            "item": [f"P{i:05d}" for i in range(cfg.n_products)],
            "brand": b,
            "adj": a,
            "colour": c,
            "noun": noun,
            "category": np.array(names)[cat],
            "price": price,
            "release_day": release,
        }
    ).select(
        "item",
        pl.concat_str([pl.col("brand"), pl.col("adj"), pl.col("colour"), pl.col("noun")], separator=" ").alias("title"),
        pl.concat_str(
            [
                pl.lit("A"),
                pl.col("adj"),
                pl.col("noun"),
                pl.lit("in"),
                pl.col("colour"),
                pl.lit("by"),
                pl.col("brand"),
                pl.lit("for your"),
                pl.col("category").str.to_lowercase(),
            ],
            separator=" ",
        ).alias("description"),
        "category",
        "price",
        "release_day",
    )
    # Power-law popularity within each category: random rank, weight rank^-a.
    rank = rng.permutation(cfg.n_products) + 1
    log_pop = -cfg.popularity_exponent * np.log(rank)
    return df, cat, log_pop


def shoppers(
    cust_m: np.ndarray, n_merchants: int, n_cat: int, style_dim: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per customer (`cust_m`: their merchant): category taste, latent style, price preference.

    Merchants differ in category mix, price level and style centre (non-IID); a customer has a
    few favourite categories drawn around their merchant's mix.
    """
    m_cat = rng.dirichlet(np.full(n_cat, 0.6), n_merchants)
    m_price = rng.normal(0, 0.4, n_merchants)
    m_style = rng.normal(0, 0.7, (n_merchants, style_dim))
    taste = rng.gamma(0.3 * m_cat[cust_m] * n_cat + 0.02, 1.0)
    taste /= taste.sum(1, keepdims=True)
    style = m_style[cust_m] + rng.normal(0, 1, (len(cust_m), style_dim))
    price_pref = m_price[cust_m] + rng.normal(0, 0.3, len(cust_m))
    return taste, style, price_pref


def purchase_events(
    n_cust: int, mean_baskets: float, mean_basket_size: float, days: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(customer, day) of every purchase line: a join day, exponential gaps between baskets."""
    n_baskets = 1 + rng.poisson(mean_baskets - 1, n_cust)
    b_cust = np.repeat(np.arange(n_cust), n_baskets)
    join = rng.integers(0, days // 2, n_cust)
    gaps = rng.exponential(days / (2 * mean_baskets), len(b_cust))
    first = np.r_[0, np.cumsum(n_baskets)[:-1]]
    cum = np.cumsum(gaps)
    b_day = join[b_cust] + (cum - np.repeat(cum[first] - gaps[first], n_baskets))
    keep = b_day < days
    b_cust, b_day = b_cust[keep], b_day[keep]
    size = 1 + rng.poisson(mean_basket_size - 1, len(b_cust))
    return np.repeat(b_cust, size), np.repeat(b_day, size)


def event_categories(taste: np.ndarray, e_cust: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Category per purchase: inverse CDF on the customer's taste."""
    cdf = np.cumsum(taste, axis=1)[e_cust]
    return np.minimum((cdf < rng.random(len(e_cust))[:, None]).sum(1), taste.shape[1] - 1)


def item_logits(
    items: np.ndarray,
    e_day: np.ndarray,
    e_style: np.ndarray,
    e_price_pref: np.ndarray,
    catalogue: dict[str, np.ndarray],
    centre: float,
    style_weight: float,
) -> np.ndarray:
    """Utility of candidate `items` ([events, candidates]) without popularity: style match, price
    fit and recency; products not yet released cannot be bought (-inf)."""
    age = e_day[:, None] - catalogue["release"][items]
    logits = (
        style_weight * np.einsum("ed,ecd->ec", e_style, catalogue["style"][items])
        - 1.5 * (catalogue["log_price"][items] - centre - e_price_pref[:, None]) ** 2
        - np.clip(age, 0, None) / 120.0
    )
    logits[age < 0] = -np.inf
    return logits


def purchases_frame(
    merchant: np.ndarray, e_cust: np.ndarray, item_ids: np.ndarray, e_item: np.ndarray, e_day: np.ndarray
) -> pl.DataFrame:
    """The purchase log; two picks of one product in one basket are one purchase line."""
    width = max(5, len(str(int(e_cust.max(initial=0)))))
    return (
        pl.DataFrame(
            {
                "merchant": merchant,
                "user": "C" + pl.Series(e_cust).cast(pl.String).str.zfill(width),
                "item": item_ids[e_item],
                "timestamp": START + (e_day * DAY).astype(np.int64),
            }
        )
        .unique(maintain_order=True)
        .sort("timestamp", "merchant", "user", "item")
    )


def generate(cfg: SyntheticConfig | None = None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return (purchases, products); same seed, same frames."""
    cfg = cfg or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    products, cat, log_pop = _catalogue(cfg, rng)
    n_cat = len(CATEGORIES)
    price = products["price"].to_numpy()
    release = products["release_day"].to_numpy()
    item_style = rng.normal(0, 1, (cfg.n_products, cfg.style_dim)) / np.sqrt(cfg.style_dim)

    m_names = [m for m, _ in cfg.merchants]
    cust_m = np.repeat(np.arange(len(m_names)), [n for _, n in cfg.merchants])
    taste, style, price_pref = shoppers(cust_m, len(m_names), n_cat, cfg.style_dim, rng)
    e_cust, e_day = purchase_events(len(cust_m), cfg.mean_baskets, cfg.mean_basket_size, cfg.days, rng)
    e_cat = event_categories(taste, e_cust, rng)

    # Item per event, Gumbel-max over every product of the category: popularity + utility.
    catalogue = {"release": release, "style": item_style, "log_price": np.log(price)}
    e_item = np.empty(len(e_cust), dtype=np.int64)
    for c in range(n_cat):
        ev = np.flatnonzero(e_cat == c)
        its = np.flatnonzero(cat == c)
        if len(ev) == 0:
            continue
        cand = np.broadcast_to(its, (len(ev), len(its)))
        centre = np.log(np.median(price[its]))
        logits = log_pop[its][None, :] + item_logits(
            cand, e_day[ev], style[e_cust[ev]], price_pref[e_cust[ev]], catalogue, centre, cfg.style_weight
        )
        gumbel = -np.log(-np.log(rng.random(logits.shape)))
        e_item[ev] = its[np.argmax(logits + gumbel, axis=1)]

    merchant = np.array(m_names)[cust_m[e_cust]]
    purchases = purchases_frame(merchant, e_cust, products["item"].to_numpy(), e_item, e_day)
    return purchases, products.drop("release_day")


def cached_log(kind: str, cfg: object, version: int, make: Callable[[], tuple[pl.DataFrame, pl.DataFrame]],
               source: str) -> PurchaseLog:  # fmt: skip
    """Read a generated log from the cache (`kind`/, keyed by generator version and config),
    generating it first with `make` (written atomically) if absent."""
    tag = f"v{version}-{hashlib.sha256(repr(cfg).encode()).hexdigest()[:10]}"
    p_path, i_path = (cache_dir() / kind / f"{part}-{tag}.parquet" for part in ("purchases", "products"))
    if not (p_path.is_file() and i_path.is_file()):
        purchases, products = make()
        write_with(i_path, lambda t: products.write_parquet(t))
        write_with(p_path, lambda t: purchases.write_parquet(t))
    items = pl.read_parquet(i_path).select(
        "item", "title", "description", "category", "price", pl.lit(None, dtype=pl.String).alias("tags")
    )
    return PurchaseLog(name=kind, interactions=pl.read_parquet(p_path), items=items, source=source)


def load(cfg: SyntheticConfig | None = None) -> PurchaseLog:
    """The embedded shop log, generated at first use."""
    cfg = cfg or SyntheticConfig()
    source = f"synthetic e-commerce log, generator v{GENERATOR_VERSION} (datasets/synthetic.py)"
    return cached_log("synthetic", cfg, GENERATOR_VERSION, lambda: generate(cfg), source)
