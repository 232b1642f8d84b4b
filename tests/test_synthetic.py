import numpy as np
import polars as pl

from fedrec.datasets import synthetic
from tests.conftest import TINY


def test_generator_is_deterministic(tiny_frames):
    a, b = synthetic.generate(TINY)
    assert a.equals(tiny_frames[0]) and b.equals(tiny_frames[1])


def test_default_shop_has_the_documented_structure():
    purchases, products = synthetic.generate()
    assert 2000 <= products.height <= 5000
    assert {"title", "description", "category", "price"} <= set(products.columns)
    sizes = purchases.group_by("merchant").agg(pl.col("user").n_unique()).sort("user", descending=True)
    assert sizes["user"][0] > 3 * sizes["user"][1], "one large merchant, several small ones"
    # power-law popularity: the top 5% of products carry a large share of purchases
    counts = np.sort(purchases["item"].value_counts()["count"].to_numpy())[::-1]
    assert counts[: len(counts) // 20].sum() / counts.sum() > 0.3
    # non-IID: merchants' category mixes differ (total variation distance)
    mix = (
        purchases.join(products.select("item", "category"), on="item")
        .group_by("merchant", "category")
        .len()
        .pivot(on="category", index="merchant", values="len")
        .fill_null(0)
    )
    m = mix.drop("merchant").to_numpy().astype(float)
    m /= m.sum(1, keepdims=True)
    tvd = 0.5 * np.abs(m[:, None, :] - m[None, :, :]).sum(-1)
    assert tvd.max() > 0.3
    assert purchases["timestamp"].max() - purchases["timestamp"].min() > 200 * 86400
