"""Export validation on load: every way an export can be broken gives a clear ExportError."""

from __future__ import annotations

import json
import shutil

import faiss
import numpy as np
import polars as pl
import pytest

from fedrec.serving.export_store import ExportError, load_export, resolve_version_dir
from fedrec.serving.index import build_index, save_index


@pytest.fixture
def root(served_root, tmp_path):
    return shutil.copytree(served_root, tmp_path / "artifacts")


def test_a_good_export_loads_with_its_merchant(root):
    export = load_export(root / "exports", "big")
    assert export.version == "v0002"
    assert export.index.ntotal == export.n_items == len(export.item_rows)
    assert export.merchant.user_vectors.shape == (len(export.merchant.user_ids), export.dim)
    assert export.merchant.purchased.shape == (len(export.merchant.user_ids), export.n_items)


def test_latest_or_a_version_directory(root):
    assert resolve_version_dir(root / "exports").name == "v0002"
    assert resolve_version_dir(root / "exports" / "v0001").name == "v0001"
    (root / "exports" / "LATEST").write_text("v0009\n")
    with pytest.raises(ExportError, match="LATEST names v0009"):
        resolve_version_dir(root / "exports")
    (root / "exports" / "LATEST").write_text("garbage\n")
    with pytest.raises(ExportError, match="expected a version name"):
        resolve_version_dir(root / "exports")


def _card(v):
    return json.loads((v / "model_card.json").read_text())


def _break_missing_file(v, m):
    (v / "items.parquet").unlink()


def _break_card_json(v, m):
    (v / "model_card.json").write_text("{not json")


def _break_card_format(v, m):
    (v / "model_card.json").write_text(json.dumps({**_card(v), "format": 99}))


def _break_card_version(v, m):
    (v / "model_card.json").write_text(json.dumps({**_card(v), "version": "v0007"}))


def _break_embedding_rows(v, m):
    np.save(v / "item_embeddings.npy", np.load(v / "item_embeddings.npy")[:-1])


def _break_embedding_nan(v, m):
    e = np.load(v / "item_embeddings.npy")
    e[0, 0] = np.nan
    np.save(v / "item_embeddings.npy", e)


def _break_index_size(v, m):
    save_index(build_index(np.load(v / "item_embeddings.npy")[:-2], "flat"), v / "index.faiss")


def _break_index_dim(v, m):
    e = np.load(v / "item_embeddings.npy")
    save_index(build_index(np.hstack([e, e]), "flat"), v / "index.faiss")


def _break_index_ids(v, m):
    e = np.load(v / "item_embeddings.npy")
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(e.shape[1]))
    index.add_with_ids(e, np.arange(e.shape[0], dtype=np.int64)[::-1].copy())
    save_index(index, v / "index.faiss")


def _break_index_bytes(v, m):
    (v / "index.faiss").write_bytes(b"\x00" * 64)


def _break_duplicate_item(v, m):
    items = pl.read_parquet(v / "items.parquet")
    ids = items["item"].to_list()
    ids[1] = ids[0]
    items.with_columns(item=pl.Series(ids)).write_parquet(v / "items.parquet")


def _break_items_column(v, m):
    pl.read_parquet(v / "items.parquet").drop("item").write_parquet(v / "items.parquet")


def _break_user_dim(v, m):
    u = np.load(m / "user_embeddings.npy")
    np.save(m / "user_embeddings.npy", u[:, :-1])


def _break_item_bias_length(v, m):
    np.save(m / "item_bias.npy", np.zeros(3, dtype=np.float32))


def _break_merchant_missing(v, m):
    shutil.rmtree(m)


@pytest.mark.parametrize(
    ("breaker", "message"),
    [
        (_break_missing_file, "missing items.parquet"),
        (_break_card_json, "model_card.json: not readable JSON"),
        (_break_card_format, "format 99 is not supported"),
        (_break_card_version, "does not match the directory name"),
        (_break_embedding_rows, "item_embeddings.npy holds"),
        (_break_embedding_nan, "NaN"),
        (_break_index_size, "index holds"),
        (_break_index_dim, "index dimension"),
        (_break_index_ids, "id map does not number"),
        (_break_index_bytes, "not a readable FAISS index"),
        (_break_duplicate_item, "duplicate id"),
        (_break_items_column, "column(s) item missing"),
        (_break_user_dim, "user_embeddings.npy: dimension"),
        (_break_item_bias_length, "item_bias.npy: expected"),
        (_break_merchant_missing, "no user embeddings for export v0002"),
    ],
)
def test_broken_exports_are_refused_with_a_message_naming_the_problem(root, breaker, message):
    version_dir = root / "exports" / "v0002"
    breaker(version_dir, root / "merchants" / "big" / "v0002")
    with pytest.raises(ExportError) as info:
        load_export(root / "exports", "big")
    assert message in str(info.value)


def test_a_loaded_export_is_out_of_the_cyclic_collectors_reach(root):
    """After a (re)load the export's objects are frozen (gc.freeze), so a full collection no
    longer walks them: 110 ms a collection with a 1M-item export, the p99 spikes of bench-serve."""
    import gc

    from fedrec.serving.settings import ServeSettings
    from fedrec.serving.state import ExportHolder

    holder = ExportHolder(ServeSettings(export=str(root / "exports"), merchant="big", watch_interval=0))
    try:
        assert holder.reload(False).error is None
        ids = holder.current.item_ids
        assert gc.is_tracked(ids) and gc.get_freeze_count() > 0
        assert not any(o is ids for o in gc.get_objects())  # get_objects skips the frozen generation
    finally:
        gc.unfreeze()


def test_the_serving_app_does_not_import_torch():
    """Serving needs numpy and FAISS only; torch cost each worker about 350 MB of resident memory
    (it came in through the run config's list of index kinds). A fresh interpreter, so the test
    does not depend on what this one has imported."""
    import subprocess
    import sys

    code = "import sys, fedrec.serving.app, fedrec.serving.state; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
