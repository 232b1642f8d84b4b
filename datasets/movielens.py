"""MovieLens-100K under the `ml100k-temporal` protocol, read from a folder the user points to.

The GroupLens terms forbid redistribution, so the files are never copied into this project:
they are read from `FEDREC_MOVIELENS_DIR`, a config value, the shared test folder, or the
folder that `fedrec download movielens-100k` fills.
"""

from __future__ import annotations

import hashlib
import io
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import polars as pl

from fedrec.atomic import atomic_dir
from fedrec.data import PurchaseLog
from fedrec.datasets import cache_dir
from fedrec.errors import DataError

ENV_VAR = "FEDREC_MOVIELENS_DIR"
OFFICIAL_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# sha256 of the official files (they are unchanged since 1998).
CHECKSUMS = {
    "u.data": "6cfffb52c89b05fbc3afb75f6912eeda04c81c2add0dc58e773a0ef6c8adb160",
    "u.item": "553841ebc7de3a0fd0d6b62a204ea30c1e651aacfb2814c7a6584ac52f2c5701",
    "u.user": "f120e114da2e8cf314fd28f99417c94ae9ddf1cb6db8ce0e4b5995d40e90e62c",
}
GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = PROJECT_ROOT.parent / "shared" / "datasets" / "movielens-100k"


def default_download_dir() -> Path:
    return cache_dir() / "movielens-100k"


def resolve_dir(configured: str | Path | None = None) -> Path:
    """Find the MovieLens folder: config, then env var, then shared folder, then download cache.
    A folder named by the config or the env var is the one read: when it has no u.data that is an
    error, not a quiet fall back to another copy (a mistyped path would otherwise go unnoticed)."""
    explicit = next(
        (
            (Path(value), name)
            for value, name in ((configured, "data.movielens_dir"), (os.environ.get(ENV_VAR), ENV_VAR))
            if value
        ),
        None,
    )
    candidates = [explicit[0]] if explicit else [SHARED_DIR, default_download_dir()]
    for c in candidates:
        if (c / "u.data").is_file():
            return c
    where = f"{explicit[0]} (from {explicit[1]}) has no u.data" if explicit else "no MovieLens folder was found"
    raise DataError(
        f"MovieLens-100K: {where}. Run `fedrec download movielens-100k` (needs internet), "
        f"or set {ENV_VAR} to a folder holding u.data, u.item and u.user."
    )


def _read_table(path: Path, sep: str, columns: list[str], encoding: str = "utf-8") -> pl.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: file not found (MovieLens-100K needs u.data, u.item, u.user)")
    text = path.read_bytes().decode(encoding)
    try:
        return pl.read_csv(
            io.StringIO(text),
            separator=sep,
            has_header=False,
            new_columns=columns,
            quote_char=None,
            infer_schema=False,
        )
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{path}: cannot parse as MovieLens ({exc})") from exc


def load(directory: str | Path | None = None, min_rating: int = 4) -> PurchaseLog:
    """Ratings >= `min_rating` become purchases; merchant = first character of the zip code."""
    d = resolve_dir(directory)
    ratings = _read_table(d / "u.data", "\t", ["user", "item", "rating", "timestamp"])
    users = _read_table(d / "u.user", "|", ["user", "age", "gender", "occupation", "zip"])
    raw_items = _read_table(d / "u.item", "|", ["item", "title", "release", "video", "url", *GENRES], "latin-1")
    try:
        ratings = ratings.with_columns(pl.col("rating").cast(pl.Int64), pl.col("timestamp").cast(pl.Int64))
    except pl.exceptions.PolarsError as exc:
        raise DataError(f"{d / 'u.data'}: rating and timestamp must be integers ({exc})") from exc
    merchant = (
        pl.when(pl.col("zip").str.slice(0, 1).str.contains(r"^[0-9]$"))
        .then(pl.col("zip").str.slice(0, 1))
        .otherwise(pl.lit("X"))
    )
    users = users.select("user", merchant.alias("merchant"))
    interactions = (
        ratings.filter(pl.col("rating") >= min_rating)
        .join(users, on="user", how="inner")
        .select("merchant", "user", "item", "timestamp")
    )
    genre_tokens = (
        pl.concat_str(
            [pl.when(pl.col(g) == "1").then(pl.lit(g)).otherwise(pl.lit("")) for g in GENRES],
            separator=" ",
        )
        .str.strip_chars()
        .str.replace_all(r"\s+", " ")
    )
    year = pl.col("release").str.extract(r"(\d{4})$")
    items = raw_items.select(
        "item",
        pl.col("title").str.replace(r"\s*\(\d{4}\)\s*$", "").alias("title"),
        pl.lit(None, dtype=pl.String).alias("category"),
        pl.lit(None, dtype=pl.Float64).alias("price"),
        pl.concat_str([genre_tokens, pl.lit(" decade"), year.str.slice(0, 3)]).fill_null(genre_tokens).alias("tags"),
        genre_tokens.str.replace_all(" ", "|").alias("genres"),
    )
    return PurchaseLog(
        name="movielens-100k",
        interactions=interactions,
        items=items,
        source=f"MovieLens-100K (GroupLens), ratings >= {min_rating}, read from {d}",
    )


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download(dest: str | Path | None = None, url: str = OFFICIAL_URL, timeout: float = 60.0) -> Path:
    """Fetch the official archive, verify every file's sha256, and unpack it atomically."""
    dest = Path(dest) if dest else default_download_dir()
    if (dest / "u.data").is_file():
        return dest
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            payload = resp.read()
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"cannot download MovieLens-100K from {url}: {reason}. If this machine is offline, "
            f"download ml-100k.zip elsewhere, unzip it and set {ENV_VAR} to the ml-100k folder."
        ) from exc
    try:
        archive = zipfile.ZipFile(io.BytesIO(payload))
    except zipfile.BadZipFile as exc:
        raise DataError(f"{url}: the download is not a zip archive") from exc
    members = {Path(n).name: n for n in archive.namelist() if not n.endswith("/")}
    for name, expected in CHECKSUMS.items():
        if name not in members:
            raise DataError(f"{url}: archive has no {name}")
        got = _sha256(archive.read(members[name]))
        if got != expected:
            raise DataError(f"{url}: checksum mismatch for {name} (sha256 {got}, expected {expected})")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(dest) as tmp:
        for name, member in members.items():
            if name.startswith("u.") or name == "README":
                (tmp / name).write_bytes(archive.read(member))
    return dest
