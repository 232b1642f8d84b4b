import numpy as np
import polars as pl

from fedrec.data import PurchaseLog
from fedrec.datasets.protocol import SplitConfig, temporal_split


def _log(rows):
    inter = pl.DataFrame(rows, schema=["merchant", "user", "item", "timestamp"], orient="row")
    items = pl.DataFrame({"item": inter["item"].unique().sort()}).with_columns(
        title=pl.col("item"),
        category=pl.lit(None, pl.String),
        price=pl.lit(None, pl.Float64),
        tags=pl.lit(None, pl.String),
    )
    return PurchaseLog("toy", inter, items)


def test_last_ceil_20_percent_is_test_and_ties_break_by_item_id():
    # 15 positives: ceil(0.2 * 15) must be 3 (floating point gives 3.0000000000000004)
    rows = [("m", "u", str(i), 100 + i) for i in range(1, 16)]
    rows[-1] = ("m", "u", "15", 114)  # tie with item 14 at t=114: item 14 sorts first
    ds = temporal_split(_log(rows), SplitConfig(val_fraction=0.1))
    m = ds.merchants[0]
    item_ids = ds.item_ids
    test_items = sorted(item_ids[m.test.indices].astype(int).tolist())
    assert test_items == [13, 14, 15]
    # val: ceil(0.1 * 12) = 2 last train items
    assert sorted(item_ids[m.val.indices].astype(int).tolist()) == [11, 12]
    assert m.train.nnz == 10


def test_large_fractions_leave_every_user_a_train_purchase():
    """ceil(0.9 x 4) would move all four of a 5-purchase user's train purchases to validation (and
    ceil(0.9 x 5) all five to test), leaving nothing to train on: the split caps there."""
    rows = [("m", "u", str(i), i) for i in range(5)]
    m = temporal_split(_log(rows), SplitConfig(val_fraction=0.9)).merchants[0]
    assert (m.train.nnz, m.val.nnz, m.test.nnz) == (1, 3, 1)
    m = temporal_split(_log(rows), SplitConfig(test_fraction=0.9, val_fraction=0.9)).merchants[0]
    assert (m.train.nnz, m.val.nnz, m.test.nnz) == (1, 0, 4)


def test_users_under_five_positives_dropped_and_repeats_collapse():
    rows = [("m", "few", str(i), i) for i in range(4)] + [("m", "ok", str(i), i) for i in range(5)]
    rows += [("m", "ok", "0", 99)]  # repeat purchase: dated by its first occurrence
    ds = temporal_split(_log(rows))
    m = ds.merchants[0]
    assert m.user_ids.tolist() == ["ok"]
    assert (m.train + m.val + m.test).nnz == 5
    assert ds.item_ids[m.test.indices].tolist() == ["4"]


def test_what_the_protocol_leaves_out_is_recorded_and_said():
    """A merchant whose every customer has fewer than 5 purchases takes no part: the card's protocol
    and `fedrec train`'s line say so instead of the merchant vanishing."""
    from fedrec.training.data import left_out_line

    rows = [("big", u, str(i), i) for u in ("a", "b") for i in range(6)]
    rows += [("small", "c", str(i), i) for i in range(6)] + [("small", "d", "1", 1)]
    rows += [("tiny", u, str(i), i) for u in ("e", "f") for i in range(4)]
    ds = temporal_split(_log(rows))
    assert [m.name for m in ds.merchants] == ["big", "small"]
    assert ds.protocol["customers_below_min_positives"] == 3  # d at small, e and f at tiny
    assert ds.protocol["merchants_left_out"] == ["tiny"]
    line = left_out_line(ds.protocol)
    assert line is not None and "3 customer(s) with fewer than 5 purchases" in line and line.endswith(": tiny")
    everyone = temporal_split(_log([r for r in rows if r[0] == "big"]))
    assert everyone.protocol["customers_below_min_positives"] == 0 and everyone.protocol["merchants_left_out"] == []
    assert left_out_line(everyone.protocol) is None


def test_no_leakage_on_generated_shop(tiny_log, tiny_dataset):
    """Every test purchase is at or after every train/val purchase of the same customer."""
    first = tiny_log.interactions.group_by("merchant", "user", "item").agg(pl.col("timestamp").min())
    ts = {(r[0], r[1], r[2]): r[3] for r in first.iter_rows()}
    ids = tiny_dataset.item_ids
    for m in tiny_dataset.merchants:
        for u in range(m.n_users):
            user = m.user_ids[u]

            def times(mat, user=user, u=u, m=m):
                return [ts[(m.name, user, ids[i])] for i in mat[u].indices]

            tr, va, te = times(m.train), times(m.val), times(m.test)
            assert te, "every kept user has test items"
            assert max(tr + va) <= min(te)
            if va:
                assert max(tr) <= min(va)
            assert not (set(m.train[u].indices) | set(m.val[u].indices)) & set(m.test[u].indices)


def test_movielens_protocol_matches_reference(ml_dataset):
    sizes = {m.name: m.n_users for m in ml_dataset.merchants}
    assert len(sizes) == 11 and set(sizes) == set("0123456789X")
    assert min(sizes.values()) == 18 and max(sizes.values()) == 170
    total = sum(m.train.nnz + m.val.nnz + m.test.nnz for m in ml_dataset.merchants)
    test = sum(m.test.nnz for m in ml_dataset.merchants)
    assert 0.2 <= test / total <= 0.26
    assert np.all(np.concatenate([m.test.getnnz(axis=1) for m in ml_dataset.merchants]) >= 1)
