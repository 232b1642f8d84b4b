"""Load and validate one export (plus this merchant's private user files) into memory.

A `LoadedExport` is immutable once built: the app swaps whole objects on reload, and each
request works on the one object it picked up, so a reload can never mix two versions.
Validation happens here, before a swap, so that a broken or partial export is refused with a
message naming the file and the problem while the previous version keeps serving.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import polars as pl
import scipy.sparse as sp

from fedrec.errors import FedrecError
from fedrec.serving.index import AnyIndex, build_index, id_map, index_kind, load_index, unit_rows

EXPORT_FILES = ("model_card.json", "item_embeddings.npy", "index.faiss", "items.parquet")
MERCHANT_FILES = ("user_embeddings.npy", "users.parquet", "purchased.npz")
ITEM_BIAS_FILE = "item_bias.npy"  # optional: the merchant's own item bias (model.merchant_item_bias)
SERVED_WEIGHT_FILE = "served_weight.json"  # optional, with the bias: its served popularity weight
# Optional, beside an approximate index.faiss: the same kind of index over the unit-length vectors,
# so similar items rank by cosine on a large catalogue too (exports before it rank by inner product).
COSINE_INDEX_FILE = "cosine.faiss"
SUPPORTED_FORMATS = (1,)
VERSION_RE = re.compile(r"^v\d{4,}$")
# Item metadata returned with every recommendation (whatever of these the export holds).
METADATA_COLUMNS = ("title", "description", "category", "price", "tags", "genres")


class ExportError(FedrecError):
    """An export directory is missing, partial or inconsistent."""


@dataclass(frozen=True)
class MerchantFiles:
    """One merchant's private side of an export version: never part of the shared export."""

    name: str
    user_ids: list[str]
    user_rows: dict[str, int]
    user_vectors: np.ndarray  # (n_users, dim) float32
    purchased: sp.csr_matrix  # (n_users, n_items) everything bought so far
    item_bias: np.ndarray | None = None  # (n_items,) this shop's own item bias, when trained with one
    # Ranks with the bias: inner product of [u, 1] with [v, b], built here from the shared vectors.
    index: AnyIndex | None = None
    # The w of u . v + w b when a request gives none: chosen on this merchant's validation slice
    # at training (fedrec/served_weight.py); 1, the trained score, where the export has no choice.
    popularity_weight: float = 1.0


@dataclass(frozen=True)
class LoadedExport:
    version: str
    path: Path
    card: dict[str, Any]
    item_ids: list[str]
    item_rows: dict[str, int]
    metadata: dict[str, list[Any]]  # column -> values by catalogue row
    item_vectors: np.ndarray  # (n_items, dim) float32
    index: AnyIndex
    merchant: MerchantFiles | None = None
    kind: str = field(default="flat")
    cosine_index: AnyIndex | None = None  # COSINE_INDEX_FILE, where the export has one

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def temperature(self) -> float:
        """The softmax temperature the model was trained with (the fold-in solves the same loss)."""
        return float(self.card.get("config", {}).get("local", {}).get("temperature", 1.0))

    @property
    def training_loss(self) -> dict[str, Any]:
        """The loss the model was trained with and its settings (the fold-in solves the same one):
        name, ials_alpha and user_solve_reg, with the defaults of an export that predates them."""
        local = self.card.get("config", {}).get("local", {})
        return {
            "name": local.get("loss", "softmax"),
            "ials_alpha": float(local.get("ials_alpha", 5.0)),
            "user_solve_reg": float(local.get("user_solve_reg", 0.0)),
        }

    def _block(self, name: str, width: str) -> tuple[float, int]:
        """A score term's weight and the width of its block in every vector, from the card's entry
        `name` (its width under `width`); (0, 0) for a model without one."""
        entry = self.card.get(name) or {}
        weight = float(entry.get("weight", 0.0))
        return (weight, int(entry.get(width, 0))) if weight > 0 else (0.0, 0)

    @property
    def content_match(self) -> tuple[float, int]:
        """The content match's block, after the tower's part (`fedrec/content_match.py`)."""
        return self._block("content_match", "basis_rank")

    @property
    def copurchase(self) -> tuple[float, int]:
        """The co-purchase term's block, the last of every vector (`fedrec/copurchase.py`)."""
        return self._block("copurchase", "width")

    @cached_property
    def copurchase_rows(self) -> np.ndarray:
        """The co-purchase block transposed, (width, n_items): row j is s times B's row j, what a
        purchase of product j adds to every product's score (`recommend.exact_top`)."""
        width = self.copurchase[1]
        return np.ascontiguousarray(self.item_vectors[:, self.dim - width :].T)

    @cached_property
    def unit_vectors(self) -> np.ndarray:
        """Item vectors scaled to length 1 (cosine similarity for similar items), built on first use."""
        return unit_rows(self.item_vectors)

    @property
    def similar_items_rule(self) -> str:
        """How `GET /v1/items/{item}/similar` ranks on this export (shown by `GET /v1/model`)."""
        if self.kind == "flat":
            return "cosine (exact)"
        if self.cosine_index is not None:
            return f"cosine ({self.kind} index of the unit-length vectors, {COSINE_INDEX_FILE})"
        return f"inner product ({self.kind}; an export without {COSINE_INDEX_FILE})"

    @cached_property
    def search_text(self) -> pl.Series:
        """Lower-case "id NUL title" per catalogue row, built on first use, for catalogue search."""
        ids = pl.Series(self.item_ids, dtype=pl.String)
        titles = pl.Series(self.metadata.get("title") or [None] * len(ids), dtype=pl.String).fill_null("")
        return (ids + "\x00" + titles).str.to_lowercase()

    @property
    def dim(self) -> int:
        return int(self.item_vectors.shape[1])

    def item_record(self, row: int) -> dict[str, Any]:
        record: dict[str, Any] = {"id": self.item_ids[row]}
        for column, values in self.metadata.items():
            value = values[row]
            if value is not None:
                record[column] = value
        return record


def resolve_version_dir(export: Path) -> Path:
    """Accept an exports root (with a LATEST file) or one version directory."""
    export = Path(export)
    if not export.exists():
        raise ExportError(f"export {export}: no such directory")
    latest = export / "LATEST"
    if latest.is_file():
        name = latest.read_text(encoding="utf-8").strip()
        if not VERSION_RE.match(name):
            raise ExportError(f"{latest}: expected a version name like v0001, found {name!r}")
        target = export / name
        if not target.is_dir():
            raise ExportError(f"{latest} names {name}, but {target} does not exist")
        return target
    if (export / "model_card.json").exists() or VERSION_RE.match(export.name):
        return export
    raise ExportError(f"export {export}: neither a version directory (model_card.json) nor an exports root (LATEST)")


def next_version(exports_dir: Path) -> str:
    """The name the next export version gets: one past the highest vNNNN in the folder."""
    taken = [int(p.name[1:]) for p in Path(exports_dir).glob("v*") if VERSION_RE.match(p.name)]
    return f"v{max(taken, default=0) + 1:04d}"


def latest_version_name(export: Path) -> str:
    """The version a watcher should be serving now (cheap: reads one small file)."""
    return resolve_version_dir(export).name


def default_merchant_dir(version_dir: Path, merchant: str) -> Path:
    """artifacts/<dataset>/exports/vNNNN -> artifacts/<dataset>/merchants/<merchant>."""
    return version_dir.parent.parent / "merchants" / merchant


def _require(directory: Path, names: tuple[str, ...], what: str) -> None:
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise ExportError(f"{what} {directory} is incomplete: missing {', '.join(missing)}")


def _read_card(path: Path) -> dict[str, Any]:
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(card, dict):
        raise ExportError(f"{path}: expected a JSON object")
    for key in ("format", "version", "items", "dim"):
        if key not in card:
            raise ExportError(f"{path}: field {key!r} is missing")
    if card["format"] not in SUPPORTED_FORMATS:
        raise ExportError(
            f"{path}: export format {card['format']!r} is not supported (this build reads {SUPPORTED_FORMATS})"
        )
    return card


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable .npy array ({exc})") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.floating):
        raise ExportError(f"{path}: expected a 2-d float array, found shape {array.shape} dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ExportError(f"{path}: contains NaN or infinite values")
    return np.ascontiguousarray(array, dtype=np.float32)


def _read_parquet(path: Path, columns: tuple[str, ...]) -> pl.DataFrame:
    try:
        frame = pl.read_parquet(path)
    except Exception as exc:  # polars raises several error types for a damaged file
        raise ExportError(f"{path}: not a readable parquet file ({exc})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ExportError(f"{path}: column(s) {', '.join(missing)} missing")
    return frame


def _check_row_index(frame: pl.DataFrame, column: str, path: Path) -> None:
    expected = np.arange(frame.height)
    if not np.array_equal(frame[column].to_numpy(), expected):
        raise ExportError(f"{path}: column {column!r} must number the rows 0..{frame.height - 1} in order")


def _check_unique(values: list[str], path: Path, column: str) -> dict[str, int]:
    rows = {v: i for i, v in enumerate(values)}
    if len(rows) != len(values):
        dup = pl.Series(values).filter(pl.Series(values).is_duplicated())[0]
        raise ExportError(f"{path}: column {column!r} has duplicate id {dup!r}")
    return rows


def _check_index(index: AnyIndex, n_items: int, dim: int, path: Path) -> None:
    if index.d != dim:
        raise ExportError(f"{path}: index dimension {index.d} differs from item embeddings ({dim})")
    if index.ntotal != n_items:
        raise ExportError(f"{path}: index holds {index.ntotal} vectors but the catalogue has {n_items} items")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ExportError(f"{path}: index metric is not inner product")
    ids = id_map(index)
    if ids is not None and not np.array_equal(ids, np.arange(n_items)):
        raise ExportError(f"{path}: id map does not number the catalogue rows 0..{n_items - 1}")


def _read_index(path: Path, n_items: int, dim: int) -> AnyIndex:
    """An export's FAISS index, read and checked against the catalogue it serves."""
    try:
        index = load_index(path)
    except (RuntimeError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable FAISS index ({str(exc).splitlines()[0]})") from None
    _check_index(index, n_items, dim, path)
    return index


def _read_cosine_index(path: Path, n_items: int, dim: int, kind: str) -> AnyIndex | None:
    """The export's second index, over unit-length vectors, where it has one (never for a flat one:
    cosine is then computed exactly); checked like index.faiss."""
    if not path.exists():
        return None
    index = _read_index(path, n_items, dim)
    if index_kind(index) != kind:
        raise ExportError(f"{path}: a {index_kind(index)} index beside a {kind} index.faiss")
    return index


def _read_item_bias(path: Path, n_items: int) -> np.ndarray:
    try:
        bias = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable .npy array ({exc})") from None
    if bias.shape != (n_items,) or not np.issubdtype(bias.dtype, np.floating):
        raise ExportError(f"{path}: expected {n_items} floats (one per catalogue item), found shape {bias.shape}")
    if not np.isfinite(bias).all():
        raise ExportError(f"{path}: contains NaN or infinite values")
    return bias.astype(np.float32)


def _read_served_weight(path: Path) -> float:
    """The merchant's served popularity weight (fedrec/served_weight.py), checked: a number in [0, 1]."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: not readable JSON ({exc})") from None
    w = entry.get("popularity_weight") if isinstance(entry, dict) else None
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or not 0 <= w <= 1:
        raise ExportError(f"{path}: popularity_weight must be a number in [0, 1], got {w!r}")
    return float(w)


def load_merchant(
    merchant_dir: Path,
    merchant: str,
    version: str,
    n_items: int,
    dim: int,
    item_vectors: np.ndarray | None = None,
    kind: str = "flat",
) -> MerchantFiles:
    """This merchant's private files; with an item bias, also its own index over [v, b]."""
    directory = Path(merchant_dir) / version
    if not directory.is_dir():
        raise ExportError(
            f"merchant {merchant!r} has no user embeddings for export {version} (expected {directory}); "
            "the user vectors must come from the same training run as the item tower"
        )
    _require(directory, MERCHANT_FILES, f"merchant {merchant!r} files")
    vectors = _read_npy(directory / "user_embeddings.npy")
    if vectors.shape[1] != dim:
        raise ExportError(
            f"{directory / 'user_embeddings.npy'}: dimension {vectors.shape[1]} differs from the items ({dim})"
        )
    users = _read_parquet(directory / "users.parquet", ("user_index", "user"))
    _check_row_index(users, "user_index", directory / "users.parquet")
    if users.height != vectors.shape[0]:
        raise ExportError(
            f"{directory}: users.parquet has {users.height} rows but user_embeddings.npy has {vectors.shape[0]}"
        )
    user_ids = users["user"].cast(pl.String).to_list()
    rows = _check_unique(user_ids, directory / "users.parquet", "user")
    try:
        purchased = sp.load_npz(directory / "purchased.npz").tocsr()
    except (OSError, ValueError) as exc:
        raise ExportError(f"{directory / 'purchased.npz'}: not a readable sparse matrix ({exc})") from None
    if purchased.shape != (len(user_ids), n_items):
        raise ExportError(
            f"{directory / 'purchased.npz'}: shape {purchased.shape}, expected ({len(user_ids)}, {n_items})"
        )
    purchased.sort_indices()
    bias, index = None, None
    if (directory / ITEM_BIAS_FILE).is_file():
        bias = _read_item_bias(directory / ITEM_BIAS_FILE, n_items)
        if item_vectors is not None:
            index = build_index(np.hstack([item_vectors, bias[:, None]]), kind)
    weight = 1.0
    if bias is not None and (directory / SERVED_WEIGHT_FILE).is_file():
        weight = _read_served_weight(directory / SERVED_WEIGHT_FILE)
    return MerchantFiles(merchant, user_ids, rows, vectors, purchased, bias, index, weight)


def load_export(export: Path, merchant: str | None = None, merchant_dir: Path | None = None) -> LoadedExport:
    """Read and cross-check every file of one export version; raise ExportError on any problem."""
    directory = resolve_version_dir(export)
    _require(directory, EXPORT_FILES, "export")
    card = _read_card(directory / "model_card.json")
    version = str(card["version"])
    if version != directory.name:
        raise ExportError(f"{directory / 'model_card.json'}: version {version!r} does not match the directory name")
    vectors = _read_npy(directory / "item_embeddings.npy")
    n_items, dim = vectors.shape
    if (card["items"], card["dim"]) != (n_items, dim):
        raise ExportError(
            f"{directory / 'model_card.json'}: says {card['items']} items of dimension {card['dim']}, "
            f"item_embeddings.npy holds {n_items} x {dim}"
        )
    items = _read_parquet(directory / "items.parquet", ("item_index", "item"))
    _check_row_index(items, "item_index", directory / "items.parquet")
    if items.height != n_items:
        raise ExportError(f"{directory / 'items.parquet'}: {items.height} rows, but {n_items} item embeddings")
    item_ids = items["item"].cast(pl.String).to_list()
    item_rows = _check_unique(item_ids, directory / "items.parquet", "item")
    metadata = {c: items[c].to_list() for c in METADATA_COLUMNS if c in items.columns}
    index = _read_index(directory / "index.faiss", n_items, dim)
    cosine = _read_cosine_index(directory / COSINE_INDEX_FILE, n_items, dim, index_kind(index))
    merchant_files = None
    if merchant is not None:
        mdir = merchant_dir if merchant_dir is not None else default_merchant_dir(directory, merchant)
        merchant_files = load_merchant(mdir, merchant, directory.name, n_items, dim, vectors, index_kind(index))
    return LoadedExport(
        version=version,
        path=directory,
        card=card,
        item_ids=item_ids,
        item_rows=item_rows,
        metadata=metadata,
        item_vectors=vectors,
        index=index,
        merchant=merchant_files,
        kind=index_kind(index),
        cosine_index=cosine,
    )
