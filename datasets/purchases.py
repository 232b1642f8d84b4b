"""Loader for a merchant's own purchase file (CSV or parquet), with errors that name the
file, column and row of the problem.

Required columns: user, item, timestamp (unix seconds, or ISO-8601 with or without an offset);
a file that names them otherwise maps its own names (`columns`, from `data.user_column` and the
like), and every message then names the file's column. Optional: merchant
(default: one merchant named after the file), title, description, category, price.
An optional catalogue file (column item, plus any of title, description, category, price) adds
the products nobody has bought yet; the export embeds those from their content.
Row numbers in messages count data rows from 1; a CSV's line number is one more (the header).
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import polars as pl

from fedrec.data import PurchaseLog
from fedrec.errors import DataError
from fedrec.folder_names import RULE, folder_name_problem

REQUIRED = ("user", "item", "timestamp")
ITEM_META = ("title", "description", "category", "price")
# Naive date-times are read as UTC. `%.f` also matches no fraction; `%#z` takes "Z", "+01:00" and
# "+0100", so the offsets and the "Z" that exports (pandas, databases, JavaScript) write are ISO too.
ISO_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
)
ISO_OFFSET_FORMATS = ("%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f %#z")


def _read(path: Path) -> pl.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give one purchase file (.csv, .tsv or .parquet)")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    separator = "\t" if suffix == ".tsv" else ","
    try:
        if suffix == ".parquet":
            return pl.read_parquet(path)
        if suffix in (".csv", ".tsv", ".txt"):
            return pl.read_csv(path, separator=separator, infer_schema=False)
    except (pl.exceptions.PolarsError, OSError) as exc:
        where = _text_problem(path, separator) if suffix != ".parquet" else None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: {where}" if where else f"{path}: cannot read as {suffix[1:]} ({first})") from exc
    raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .parquet")


def _text_problem(path: Path, separator: str) -> str | None:
    """Where a delimited file that polars refused goes wrong, by row, or None when this finds nothing:
    polars names neither the line of a byte that is not UTF-8 nor that of a row with extra fields.
    Runs only after a failed read, so its pass over the rows in Python costs nothing otherwise."""
    with path.open("rb") as raw:  # line by line: the file may be far larger than memory allows twice
        for line, data in enumerate(raw, start=1):
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (
                    f"row {line - 1} (line {line}) is not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                    "save the file as UTF-8 (for example: iconv -f latin1 -t utf-8)"
                )
    with path.open(encoding="utf-8-sig", newline="") as text:
        reader = csv.reader(text, delimiter=separator, strict=True)
        row = -1  # the header
        try:
            header = next(reader, [])
            row = 0
            for row, fields in enumerate(reader, start=1):
                if len(fields) > len(header):
                    return (
                        f"row {row} (line {reader.line_num}) has {len(fields)} fields, the header {len(header)}; "
                        "a value with the separator in it needs double quotes"
                    )
        except csv.Error as exc:
            where = "the header" if row < 0 else f"row {row + 1}"
            return f"{where} (line {reader.line_num}): bad quoting ({exc}); a quote inside a value is written twice"
    return None


def _renamed(df: pl.DataFrame, columns: Mapping[str, str], path: Path) -> pl.DataFrame:
    """The file's own column names (`columns`: ours -> the file's) renamed to ours."""
    mapping = {theirs: ours for ours, theirs in columns.items() if theirs != ours}
    for theirs, ours in mapping.items():
        if theirs in df.columns and ours in df.columns:
            raise DataError(
                f"{path}: column {theirs!r} is read as {ours!r}, but the file also has a column {ours!r}; "
                f"rename or drop one of them"
            )
    return df.rename({t: o for t, o in mapping.items() if t in df.columns})


def _check_unique(df: pl.DataFrame, names: Sequence[str], path: Path) -> None:
    """A column the loader reads must appear once in the header: polars keeps the first of two
    and renames the second `<name>_duplicated_0`, so which one is read would be a silent guess."""
    for name in names:
        if f"{name}_duplicated_0" in df.columns and name in df.columns:
            first, second = df.columns.index(name) + 1, df.columns.index(f"{name}_duplicated_0") + 1
            raise DataError(
                f"{path}: column {name!r} appears more than once in the header (columns {first} and {second}); "
                f"rename or drop the extra one"
            )


def _separator_hint(df: pl.DataFrame, path: Path) -> str:
    """A header read as one column usually means another separator (Excel writes ';' in many locales)."""
    if df.width == 1:
        for sep in (";", "\t", "|"):
            if sep in df.columns[0]:
                return (
                    f" (one column: is the file separated by {sep!r}? {path.suffix} files must use ',' or a .tsv tab)"
                )
    return ""


def _check_flat(df: pl.DataFrame, columns: Sequence[str], path: Path, shown: Mapping[str, str]) -> None:
    """Ids and product metadata are one text or number per row: a list or struct column (parquet
    can hold them) is named here rather than failing later in a cast."""
    for c in columns:
        if c in df.columns and (df[c].dtype.is_nested() or df[c].dtype == pl.Object):
            raise DataError(
                f"{path}: column {shown.get(c, c)!r} holds {df[c].dtype} values; give one text or number per row"
            )


def _first_bad_row(df: pl.DataFrame, bad: pl.Expr) -> int | None:
    hit = df.with_row_index("_row", offset=1).filter(bad).select("_row").head(1)
    return int(hit.item()) if hit.height else None


def _parse_timestamp(df: pl.DataFrame, path: Path, shown: str = "timestamp") -> pl.Series:
    """Unix seconds (whole or fractional, floored: only the order of purchases matters) or an
    ISO-8601 date or date-time, with or without an offset, as unix seconds in UTC."""
    col = df["timestamp"]
    if col.dtype.is_nested() or col.dtype in (pl.Duration, pl.Time, pl.Object):
        raise DataError(
            f"{path}: column {shown!r} holds {col.dtype} values; give unix seconds or ISO-8601 dates or date-times"
        )
    if col.dtype.is_integer():
        return col.cast(pl.Int64)
    if col.dtype.is_float():
        row = _first_bad_row(df, ~pl.col("timestamp").is_finite())
        if row is not None:
            raise DataError(f"{path}: column {shown!r}, row {row}: {col[row - 1]!r} is not a time")
        return col.floor().cast(pl.Int64)
    if col.dtype == pl.Datetime or col.dtype == pl.Date:
        return col.cast(pl.Datetime("ms")).dt.epoch("s")
    text = col.cast(pl.String).str.strip_chars()
    as_number = text.cast(pl.Float64, strict=False)
    as_number = pl.select(
        pl.when(as_number.is_finite()).then(as_number.floor()).cast(pl.Int64, strict=False)
    ).to_series()
    as_int = text.cast(pl.Int64, strict=False).fill_null(as_number)
    naive = [text.str.strptime(pl.Datetime("ms"), f, strict=False).dt.epoch("s") for f in ISO_FORMATS]
    offset = [text.str.strptime(pl.Datetime("ms", "UTC"), f, strict=False).dt.epoch("s") for f in ISO_OFFSET_FORMATS]
    as_dt = pl.select(pl.coalesce([*offset, *naive])).to_series()
    parsed = as_int.fill_null(as_dt)
    bad_rows = parsed.is_null() & text.is_not_null()
    if bad_rows.any():
        row = int(bad_rows.arg_true()[0]) + 1
        raise DataError(
            f"{path}: column {shown!r}, row {row}: {text[row - 1]!r} is neither unix seconds "
            "nor an ISO-8601 date/time (such as 2024-01-31, 2024-01-31 14:05:00 or "
            "2024-01-31T14:05:00+01:00)"
        )
    return parsed


def load(
    path: str | Path,
    name: str | None = None,
    merchants: Sequence[str] | None = None,
    catalogue: str | Path | None = None,
    columns: Mapping[str, str] | None = None,
) -> PurchaseLog:
    """Validate and load a purchase file. `merchants`, when given, is the list of known merchants;
    `catalogue`, an optional product file that also lists products without purchases; `columns`,
    the file's own names for user, item, timestamp and merchant (ours -> the file's)."""
    path = Path(path)
    columns = dict(columns or {})
    shown = {c: columns.get(c, c) for c in (*REQUIRED, "merchant")}
    df = _read(path)
    if df.height == 0:
        raise DataError(f"{path}: file has a header but no rows")
    _check_unique(df, (*shown.values(), *ITEM_META), path)
    missing = [shown[c] for c in REQUIRED if shown[c] not in df.columns]
    if missing:
        raise DataError(
            f"{path}: missing required column(s) {', '.join(map(repr, missing))}; "
            f"found {', '.join(map(repr, df.columns))}{_separator_hint(df, path)}"
        )
    if shown["merchant"] != "merchant" and shown["merchant"] not in df.columns:
        raise DataError(
            f"{path}: no column {shown['merchant']!r} (the merchant column set); found "
            f"{', '.join(map(repr, df.columns))}"
        )
    df = _renamed(df, columns, path)
    _check_flat(df, ("user", "item", "merchant", *ITEM_META), path, shown)
    for c in (*REQUIRED, "merchant"):
        if c in df.columns and df[c].null_count():
            row = _first_bad_row(df, pl.col(c).is_null() | (pl.col(c).cast(pl.String) == ""))
            raise DataError(f"{path}: column {shown[c]!r}, row {row}: value is empty")
    df = _numeric_price(df.with_columns(timestamp=_parse_timestamp(df, path, shown["timestamp"])), path)
    if "merchant" not in df.columns:
        df = df.with_columns(merchant=pl.lit(name or path.stem))
    df = df.with_columns(pl.col("user", "item", "merchant").cast(pl.String))
    unsafe = {m: why for m in df["merchant"].unique().to_list() if (why := folder_name_problem(m)) is not None}
    if unsafe:  # a merchant's name becomes its folder in the export: "../x" would write outside it
        row = _first_bad_row(df, pl.col("merchant").is_in(list(unsafe)))
        bad = df["merchant"][row - 1]
        raise DataError(
            f"{path}: column {shown['merchant']!r}, row {row}: merchant {bad!r} {unsafe[bad]}; a merchant's "
            f"name is its folder's name ({RULE})"
        )
    if merchants is not None:
        known = set(merchants)
        row = _first_bad_row(df, ~pl.col("merchant").is_in(list(known)))
        if row is not None:
            raise DataError(
                f"{path}: column {shown['merchant']!r}, row {row}: unknown merchant "
                f"{df['merchant'][row - 1]!r}; known: {', '.join(sorted(known))}"
            )
    # Exact duplicate rows stay: an order-line export writes one line per unit bought, and the
    # protocol counts a repeat purchase as one positive anyway (`datasets/protocol.py`).
    key = ["merchant", "user", "item", "timestamp"]
    items = _item_table(df)
    if catalogue is not None:
        items = _with_catalogue(items, Path(catalogue), shown["item"])
    return PurchaseLog(
        name=name or path.stem,
        interactions=df.select(*key),
        items=items,
        source=f"purchase file {path}" + (f", catalogue {catalogue}" if catalogue is not None else ""),
    )


def _numeric_price(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    if "price" not in df.columns:
        return df
    price = df["price"].cast(pl.Float64, strict=False)
    bad = price.is_null() & df["price"].is_not_null() & (df["price"].cast(pl.String) != "")
    if bad.any():
        row = int(bad.arg_true()[0]) + 1
        raise DataError(f"{path}: column 'price', row {row}: {df['price'][row - 1]!r} is not a number")
    return df.with_columns(price=price)


def _with_catalogue(items: pl.DataFrame, path: Path, item_column: str = "item") -> pl.DataFrame:
    """The purchase file's products plus every product of a catalogue file (columns item and any
    of title, description, category, price), so products nobody bought yet are exported too.
    The catalogue's metadata wins where both describe a product. `item_column`: the purchase
    file's name for the product id, which the catalogue shares."""
    df = _read(path)
    _check_unique(df, (item_column, *ITEM_META), path)
    if item_column not in df.columns:
        raise DataError(
            f"{path}: missing required column {item_column!r}; found {', '.join(map(repr, df.columns))}"
            f"{_separator_hint(df, path)}"
        )
    df = _renamed(df, {"item": item_column}, path)
    _check_flat(df, ("item", *ITEM_META), path, {"item": item_column})
    row = _first_bad_row(df, pl.col("item").is_null() | (pl.col("item").cast(pl.String) == ""))
    if row is not None:
        raise DataError(f"{path}: column {item_column!r}, row {row}: value is empty")
    df = _numeric_price(df.with_columns(pl.col("item").cast(pl.String)), path)
    dup = df.with_row_index("_row", offset=1).filter(pl.col("item").is_duplicated())
    if dup.height:
        rows = dup["_row"].head(2).to_list()
        raise DataError(f"{path}: rows {rows[0]} and {rows[1]} describe the same item {dup['item'][0]!r}")
    listed = _item_table(df)
    return pl.concat([listed, items.join(listed.select("item"), on="item", how="anti")])


def _item_table(df: pl.DataFrame) -> pl.DataFrame:
    """One row per item with every metadata column (missing ones null; the title defaults to the id)."""
    meta_cols = [c for c in ITEM_META if c in df.columns]
    return (
        df.select("item", *meta_cols)
        .unique("item", keep="first", maintain_order=True)
        .with_columns(
            *[
                pl.lit(None, dtype=pl.Float64 if c == "price" else pl.String).alias(c)
                for c in ITEM_META
                if c not in meta_cols
            ],
            tags=pl.lit(None, dtype=pl.String),
        )
        .with_columns(pl.col("title").fill_null(pl.col("item")))
        .select("item", "title", "description", "category", "price", "tags")
    )
