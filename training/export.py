"""The versioned export: what the coordinator publishes, and what each merchant keeps.

artifacts/<dataset>/exports/vNNNN/      shared: no user data in here
    item_embeddings.npy, index.faiss, items.parquet, item_tower.pt, model_card.json,
    cosine.faiss (beside an approximate index: the unit-length vectors, for similar items)
artifacts/<dataset>/exports/LATEST      name of the newest complete version
artifacts/<dataset>/merchants/<m>/vNNNN/ private to merchant m
    user_embeddings.npy, users.parquet, purchased.npz, item_bias.npy (when the model has one)
Each version directory is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl
import torch

from fedrec import __version__
from fedrec.atomic import atomic_dir, write_json, write_text
from fedrec.config import RunConfig
from fedrec.data import FederatedDataset
from fedrec.features import build_item_features
from fedrec.federated.merchant_node import write_merchant_export
from fedrec.model import catalogue_embeddings
from fedrec.serving.export_store import COSINE_INDEX_FILE, next_version
from fedrec.serving.index import build_index, index_kind, save_index, unit_rows

EXPORT_FORMAT = 1


def write_shared_export(
    exports: Path,
    version: str,
    cfg: RunConfig,
    items: pl.DataFrame,
    item_state: dict[str, torch.Tensor],
    item_vectors: np.ndarray,
    card: dict,
) -> Path:
    """The coordinator's half of an export version: no user data in here."""
    target = exports / version
    with atomic_dir(target) as tmp:
        np.save(tmp / "item_embeddings.npy", item_vectors.astype(np.float32))
        index = build_index(item_vectors, cfg.output.index)
        save_index(index, tmp / "index.faiss")
        if index_kind(index) != "flat":  # similar items by cosine: a flat catalogue computes it exactly
            save_index(build_index(unit_rows(item_vectors), index_kind(index)), tmp / COSINE_INDEX_FILE)
        items.with_row_index("item_index").write_parquet(tmp / "items.parquet")
        torch.save({"state_dict": item_state, "model_config": cfg.to_dict()["model"]}, tmp / "item_tower.pt")
        write_json(
            tmp / "model_card.json",
            {
                "format": EXPORT_FORMAT,
                "version": version,
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "fedrec_version": __version__,
                "items": int(item_vectors.shape[0]),
                "dim": int(item_vectors.shape[1]),
                "index": index_kind(index),
                "score": "inner product (dot product of user and item vectors)",
                **card,
            },
        )
    return target


def export_catalogue(
    cfg: RunConfig, items: pl.DataFrame, new_items: pl.DataFrame | None, item_state: dict[str, torch.Tensor]
) -> tuple[pl.DataFrame, np.ndarray]:
    """The products an export serves and their vectors: the trained products, then every catalogue
    product nobody has bought yet, embedded from its content (`catalogue_embeddings`)."""
    n_trained = items.height
    if new_items is not None and new_items.height:
        items = pl.concat([items, new_items.select(items.columns)], how="vertical_relaxed")
    features = build_item_features(items, cfg.model.hash_buckets)
    return items, catalogue_embeddings(item_state, features, cfg.model, n_trained).numpy()


def new_items_entry(cfg: RunConfig) -> str:
    """The model card's word on products without purchases."""
    if cfg.model.use_content:
        return "exported after the products with purchases, embedded by the content tower alone"
    return (
        "exported after the products with purchases: the trained vectors averaged by TF-IDF content "
        "similarity (the model has no content tower)"
    )


def publish(exports: Path, version: str) -> None:
    """Point LATEST at a version once both halves are written (servers reload on this)."""
    write_text(exports / "LATEST", version + "\n")


def write_export(
    root: Path,
    cfg: RunConfig,
    dataset: FederatedDataset,
    items: pl.DataFrame,
    item_state: dict[str, torch.Tensor],
    item_vectors: np.ndarray,
    user_embeddings: dict[str, torch.Tensor],
    card: dict,
    item_biases: dict[str, torch.Tensor | None] | None = None,
    served_weights: dict[str, dict] | None = None,
) -> Path:
    """In-process runtime: the shared export and every merchant's private half, in one place.

    `items` is the served catalogue: the dataset's products, possibly followed by new ones.
    `served_weights`: each merchant's served popularity weight, as `ServedWeight.entry()`.
    """
    exports = root / "exports"
    version = next_version(exports)
    target = write_shared_export(exports, version, cfg, items, item_state, item_vectors, card)
    for m in dataset.merchants:
        bias = (item_biases or {}).get(m.name)
        served = (served_weights or {}).get(m.name)
        write_merchant_export(
            root / "merchants" / m.name / version, m, user_embeddings[m.name], bias, items.height, served
        )  # fmt: skip
    publish(exports, version)
    return target
