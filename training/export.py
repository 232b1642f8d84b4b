"""The versioned export: what the coordinator publishes, and what each merchant keeps.

artifacts/<dataset>/exports/vNNNN/      shared: no user data in here
    item_embeddings.npy, index.faiss, items.parquet, item_tower.pt, model_card.json
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
import scipy.sparse as sp
import torch

from fedrec import __version__
from fedrec.atomic import atomic_dir, write_json, write_text
from fedrec.config import RunConfig
from fedrec.data import FederatedDataset
from fedrec.serving.export_store import next_version
from fedrec.serving.index import build_index, index_kind, save_index

EXPORT_FORMAT = 1


def write_export(
    root: Path,
    cfg: RunConfig,
    dataset: FederatedDataset,
    item_state: dict[str, torch.Tensor],
    item_vectors: np.ndarray,
    user_embeddings: dict[str, torch.Tensor],
    card: dict,
    item_biases: dict[str, torch.Tensor | None] | None = None,
) -> Path:
    exports = root / "exports"
    version = next_version(exports)
    target = exports / version
    with atomic_dir(target) as tmp:
        np.save(tmp / "item_embeddings.npy", item_vectors.astype(np.float32))
        index = build_index(item_vectors, cfg.output.index)
        save_index(index, tmp / "index.faiss")
        dataset.items.with_row_index("item_index").write_parquet(tmp / "items.parquet")
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
    for m in dataset.merchants:
        mdir = root / "merchants" / m.name / version
        with atomic_dir(mdir) as tmp:
            np.save(tmp / "user_embeddings.npy", user_embeddings[m.name].numpy().astype(np.float32))
            pl.DataFrame({"user": m.user_ids.astype(str)}).with_row_index("user_index").write_parquet(
                tmp / "users.parquet"
            )
            # Everything the customer bought so far, for "exclude already bought".
            sp.save_npz(tmp / "purchased.npz", (m.full_train + m.test).tocsr())
            bias = (item_biases or {}).get(m.name)
            if bias is not None:  # this shop's own item popularity: private, like its users
                np.save(tmp / "item_bias.npy", bias.numpy().astype(np.float32))
    write_text(exports / "LATEST", version + "\n")
    return target
