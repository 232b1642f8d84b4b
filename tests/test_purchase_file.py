import re

import polars as pl
import pytest

from fedrec.datasets.purchases import load
from fedrec.errors import DataError


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "name, text, kwargs, message",
    [
        ("empty.csv", "", {}, "empty.csv: file is empty"),
        ("header.csv", "user,item,timestamp\n", {}, "header.csv: file has a header but no rows"),
        ("cols.csv", "user,item,when\nu,i,1\n", {}, "missing required column(s) 'timestamp'"),
        ("semi.csv", "user;item;timestamp\nu;i;1\n", {}, "one column: is the file separated by ';'"),
        ("ts.csv", "user,item,timestamp\nu,i,1\nu,j,yesterday\n", {}, "column 'timestamp', row 2: 'yesterday'"),
        ("price.csv", "user,item,timestamp,price\nu,i,1,2.5\nu,j,2,cheap\n", {}, "column 'price', row 2: 'cheap'"),
        ("nulls.csv", "user,item,timestamp\nu,i,1\n,j,2\n", {}, "column 'user', row 2: value is empty"),
        (
            "merchant.csv",
            "user,item,timestamp,merchant\nu,i,1,a\nu,j,2,zz\n",
            {"merchants": ["a", "b"]},
            "column 'merchant', row 2: unknown merchant 'zz'",
        ),
        ("data.json", "{}", {}, "unsupported file type '.json'"),
        ("extra.csv", "user,item,timestamp\nu,i,1\nu,j,2,x\n", {}, "row 2 (line 3) has 4 fields, the header 3"),
        ("extra.tsv", "user\titem\ttimestamp\nu\ti\t1\t\n", {}, "row 1 (line 2) has 4 fields, the header 3"),
        ("quote.csv", 'user,item,timestamp\nu,i,1\nu,i,2\nu,"j"k,3\n', {}, "row 3 (line 4): bad quoting"),
        (
            "twice.csv",
            "user,item,timestamp,user\nu,i,1,v\n",
            {},
            "column 'user' appears more than once in the header (columns 1 and 4)",
        ),
        ("title.csv", "user,title,item,timestamp,title\nu,a,i,1,b\n", {}, "column 'title' appears more than once"),
    ],
)
def test_bad_files_name_file_column_and_row(tmp_path, name, text, kwargs, message):
    path = write(tmp_path, name, text)
    with pytest.raises(DataError) as exc:
        load(path, **kwargs)
    assert message in str(exc.value)
    assert name in str(exc.value)


def test_text_that_is_not_utf8_is_named_by_row(tmp_path):
    """Polars names no line for a byte that is not UTF-8: the message does, and says what to do."""
    path = tmp_path / "latin1.csv"
    path.write_bytes("user,item,timestamp\nu,i,1\nJosé,j,2\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv: row 2 \(line 3\) is not UTF-8 text \(byte 0xe9\); save"):
        load(path)


def test_a_folder_is_refused_as_a_folder(tmp_path):
    folder = tmp_path / "shop.csv"
    folder.mkdir()
    with pytest.raises(DataError, match="shop.csv: is a folder; give one purchase file"):
        load(folder)


@pytest.mark.parametrize("merchant", ["../../escape", "a/b", "a\\b", "..", " shop", "tab\there", "é" * 101])
def test_a_merchant_name_that_would_leave_its_folder_is_refused(tmp_path, merchant):
    """A merchant's name becomes its export folder: "../../escape" once wrote a merchant's user
    vectors outside the artifacts folder."""
    path = tmp_path / "shop.csv"
    pl.DataFrame(
        {"user": ["u", "u", "v"], "item": ["i", "j", "i"], "timestamp": [1, 2, 3], "merchant": ["ok", "ok", merchant]}
    ).write_csv(path)
    with pytest.raises(DataError, match=r"shop.csv: column 'merchant', row 3: merchant .* a merchant's name is its"):
        load(path)


def test_merchant_names_with_spaces_dots_and_letters_of_any_script_load(tmp_path):
    path = tmp_path / "shop.csv"
    names = ["Shop A", "shop.eu", "...x", "Café-Ü", "店"]
    pl.DataFrame({"user": names, "item": ["i"] * 5, "timestamp": [1] * 5, "merchant": names}).write_csv(path)
    assert sorted(load(path).interactions["merchant"].unique().to_list()) == sorted(names)


def test_parquet_columns_of_the_wrong_kind_are_named(tmp_path):
    """Parquet can hold lists, structs and durations, which once ended in a traceback in a cast."""
    base = pl.DataFrame({"user": ["u", "v"], "item": ["i", "j"], "timestamp": [1, 2]})
    cases = {
        "list.parquet": (base.with_columns(pl.concat_list("item").alias("item")), "column 'item' holds List"),
        "struct.parquet": (base.with_columns(pl.struct("user").alias("user")), "column 'user' holds Struct"),
        "title.parquet": (base.with_columns(title=pl.concat_list("item")), "column 'title' holds List"),
        "dur.parquet": (
            base.with_columns(pl.duration(seconds=pl.col("timestamp")).alias("timestamp")),
            "column 'timestamp' holds Duration",
        ),
    }
    for name, (df, message) in cases.items():
        df.write_parquet(tmp_path / name)
        with pytest.raises(DataError, match=re.escape(f"{name}: {message}")):
            load(tmp_path / name)
    base.write_parquet(tmp_path / "ok.parquet")
    pl.DataFrame({"item": ["k"], "category": [["a", "b"]]}).write_parquet(tmp_path / "cat.parquet")
    with pytest.raises(DataError, match="cat.parquet: column 'category' holds List"):
        load(tmp_path / "ok.parquet", catalogue=tmp_path / "cat.parquet")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope.csv: file not found"):
        load(tmp_path / "nope.csv")


def test_good_file_accepts_unix_and_iso_times_and_metadata(tmp_path):
    path = write(
        tmp_path,
        "ok.csv",
        "user,item,timestamp,merchant,title,price\n"
        "u1,i1,1700000000,a,Red mug,3.5\nu1,i2,2024-01-02T10:00:00,a,Blue pan,\nu2,i1,2024-01-03,b,Red mug,3.5\n",
    )
    log = load(path)
    assert log.interactions["timestamp"].to_list() == [1700000000, 1704189600, 1704240000]
    assert log.items.filter(log.items["item"] == "i1")["title"].item() == "Red mug"
    assert log.interactions["merchant"].unique().sort().to_list() == ["a", "b"]


@pytest.mark.parametrize(
    ("written", "seconds"),
    [
        ("2024-01-02T10:00:00Z", 1704189600),
        ("2024-01-02T10:00:00.250Z", 1704189600),
        ("2024-01-02T11:00:00+01:00", 1704189600),
        ("2024-01-02 05:00:00-0500", 1704189600),
        ("2024-01-02 10:00:00 +00:00", 1704189600),
        ("2024-01-02 10:00:00.123456", 1704189600),
        ("2024-01-02 10:00", 1704189600),
        ("1704189600.75", 1704189600),
    ],
)
def test_iso_offsets_and_fractional_unix_seconds_are_read(tmp_path, written, seconds):
    # what exports write: a "Z" or an offset (converted to UTC), fractions of a second, floats
    path = write(tmp_path, "t.csv", f"user,item,timestamp\nu1,i1,{written}\nu1,i2,1704189601\n")
    assert load(path).interactions["timestamp"].to_list() == [seconds, 1704189601]


def test_float_timestamps_in_parquet_are_floored(tmp_path):
    path = tmp_path / "f.parquet"
    pl.DataFrame({"user": ["u", "u"], "item": ["a", "b"], "timestamp": [1.9, 3.2]}).write_parquet(path)
    assert load(path).interactions["timestamp"].to_list() == [1, 3]
    pl.DataFrame({"user": ["u", "u"], "item": ["a", "b"], "timestamp": [1.0, float("nan")]}).write_parquet(path)
    with pytest.raises(DataError, match="column 'timestamp', row 2: nan is not a time"):
        load(path)


@pytest.mark.parametrize("written", ["05/01/2024", "nan", "inf", "2024-13-01"])
def test_ambiguous_or_invalid_times_are_refused_with_the_row(tmp_path, written):
    path = write(tmp_path, "t.csv", f"user,item,timestamp\nu1,i1,1\nu1,i2,{written}\n")
    with pytest.raises(DataError, match=f"column 'timestamp', row 2: '{written}' is neither"):
        load(path)


def test_exact_duplicate_rows_are_one_purchase(tmp_path):
    # one line per unit bought: the same customer, product and time twice is kept, and the
    # protocol counts it once, as it counts any repeat purchase
    from fedrec.datasets.protocol import temporal_split

    rows = "".join(f"u1,i{k},{k}\n" for k in range(6))
    log = load(write(tmp_path, "d.csv", "user,item,timestamp\n" + rows + "u1,i0,0\n"))
    assert log.interactions.height == 7
    merchant = temporal_split(log).merchants[0]
    assert (merchant.train + merchant.val + merchant.test).sum() == 6


SHOP = {"user": "customer_id", "item": "sku", "timestamp": "ordered_at", "merchant": "shop"}


def test_a_file_with_its_own_column_names_is_mapped(tmp_path):
    path = write(tmp_path, "own.csv", "customer_id,sku,ordered_at,shop,title\nc1,s1,1,a,Mug\nc1,s2,2,b,Pan\n")
    cat = write(tmp_path, "cat.csv", "sku,title\ns3,Lid\n")
    log = load(path, catalogue=cat, columns=SHOP)
    assert log.interactions.columns == ["merchant", "user", "item", "timestamp"]
    assert log.interactions.rows() == [("a", "c1", "s1", 1), ("b", "c1", "s2", 2)]
    assert sorted(log.items["item"].to_list()) == ["s1", "s2", "s3"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("customer_id,sku,when,shop\nc,s,1,a\n", "missing required column(s) 'ordered_at'"),
        ("customer_id,sku,ordered_at,shop\nc,s,1,a\n,s,2,a\n", "column 'customer_id', row 2: value is empty"),
        ("customer_id,sku,ordered_at,shop\nc,s,soon,a\n", "column 'ordered_at', row 1: 'soon' is neither"),
        ("customer_id,sku,ordered_at\nc,s,1\n", "no column 'shop' (the merchant column set)"),
        ("customer_id,user,sku,ordered_at,shop\nc,d,s,1,a\n", "column 'customer_id' is read as 'user', but"),
        ("customer_id,sku,ordered_at,shop,sku\nc,s,1,a,t\n", "column 'sku' appears more than once in the header"),
    ],
)
def test_messages_name_the_files_own_columns(tmp_path, text, message):
    with pytest.raises(DataError, match=re.escape(message)):
        load(write(tmp_path, "own.csv", text), columns=SHOP)


def test_unknown_merchant_names_the_files_column(tmp_path):
    path = write(tmp_path, "own.csv", "customer_id,sku,ordered_at,shop\nc,s,1,zz\n")
    with pytest.raises(DataError, match="column 'shop', row 1: unknown merchant 'zz'"):
        load(path, merchants=["a"], columns=SHOP)


def test_a_repeated_column_the_loader_does_not_read_is_kept_out_of_the_way(tmp_path):
    """Only the columns read must be unique: two 'note' columns of an order export are ignored."""
    log = load(write(tmp_path, "notes.csv", "user,note,item,timestamp,note\nu,x,i,1,y\nu,x,j,2,y\n"))
    assert log.interactions["item"].to_list() == ["i", "j"]


def test_parquet_round_trip(tiny_frames, tmp_path):
    purchases, _ = tiny_frames
    path = tmp_path / "shop.parquet"
    purchases.write_parquet(path)
    log = load(path)
    assert log.interactions.height == purchases.height


GOOD = "user,item,timestamp\nu1,a,1\nu1,b,2\n"


@pytest.mark.parametrize(
    ("catalogue", "message"),
    [
        ("title\nx\n", "missing required column 'item'"),
        ("item,title\na,x\n,y\n", "column 'item', row 2: value is empty"),
        ("item,price\na,1\nc,cheap\n", "column 'price', row 2: 'cheap' is not a number"),
        ("item,title\nc,x\nc,y\n", "rows 1 and 2 describe the same item 'c'"),
        ("item,price,price\nc,1,2\n", "column 'price' appears more than once in the header (columns 2 and 3)"),
    ],
)
def test_bad_catalogue_files_name_file_column_and_row(tmp_path, catalogue, message):
    (tmp_path / "p.csv").write_text(GOOD)
    (tmp_path / "cat.csv").write_text(catalogue)
    with pytest.raises(DataError, match="cat.csv: " + re.escape(message)):
        load(tmp_path / "p.csv", catalogue=tmp_path / "cat.csv")


def test_catalogue_file_adds_unsold_products_and_its_metadata_wins(tmp_path):
    (tmp_path / "p.csv").write_text("user,item,timestamp,title\nu1,a,1,old\nu1,b,2,bee\n")
    (tmp_path / "cat.csv").write_text("item,title,price\na,new,3.5\nc,sea,1\n")
    items = load(tmp_path / "p.csv", catalogue=tmp_path / "cat.csv").items
    titles = dict(zip(items["item"].to_list(), items["title"].to_list(), strict=True))
    assert titles == {"a": "new", "b": "bee", "c": "sea"}
