"""Hot reload under load: requests in flight never fail and never mix two versions."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import numpy as np
import polars as pl

from fedrec.serving.settings import ServeSettings
from tests.live_server import live_server

MERCHANT = "big"


def expected_top(root, version, user_row, k=5):
    mdir = root / "merchants" / MERCHANT / version
    u = np.load(mdir / "user_embeddings.npy")[user_row]
    v = np.load(root / "exports" / version / "item_embeddings.npy")
    items = pl.read_parquet(root / "exports" / version / "items.parquet")["item"].to_list()
    return [items[i] for i in np.argsort(-(v @ u))[:k]]


def test_watcher_swaps_versions_under_concurrent_requests(served_root, tmp_path):
    root = shutil.copytree(served_root, tmp_path / "artifacts")
    customer = pl.read_parquet(root / "merchants" / MERCHANT / "v0002" / "users.parquet")["user"][0]
    truth = {v: expected_top(root, v, 0) for v in ("v0001", "v0002")}
    assert truth["v0001"] != truth["v0002"], "the two seeds should give different rankings"

    settings = ServeSettings(export=str(root / "exports"), merchant=MERCHANT, watch_interval=0.02)
    url_path = f"/v1/merchants/{MERCHANT}/customers/{customer}/recommendations"
    answers: list[tuple[int, str | None, list[str]]] = []
    failures: list[str] = []
    stop = threading.Event()

    def hammer(base: str) -> None:
        with httpx.Client(base_url=base, timeout=10) as client:
            while not stop.is_set():
                try:
                    r = client.get(url_path, params={"k": 5, "exclude_purchased": "false"})
                    body = r.json()
                    answers.append((r.status_code, body.get("version"), [it["id"] for it in body.get("items", [])]))
                except Exception as exc:  # a dropped connection is a failure too
                    failures.append(repr(exc))

    with live_server(settings) as base:
        workers = [threading.Thread(target=hammer, args=(base,)) for _ in range(4)]
        for w in workers:
            w.start()
        seen_versions = set()
        for i in range(12):  # flip LATEST back and forth while the load runs
            (root / "exports" / "LATEST").write_text(("v0001" if i % 2 == 0 else "v0002") + "\n")
            deadline = time.monotonic() + 10
            want = "v0001" if i % 2 == 0 else "v0002"
            while httpx.get(base + "/readyz").json()["version"] != want:
                assert time.monotonic() < deadline, "watcher did not pick up the new LATEST"
                time.sleep(0.01)
            seen_versions.add(want)
            time.sleep(0.05)
        stop.set()
        for w in workers:
            w.join()

    assert not failures
    assert len(answers) > 50
    assert {status for status, _, _ in answers} == {200}
    assert {version for _, version, _ in answers} == {"v0001", "v0002"}
    for _, version, items in answers:  # each answer is wholly from the version it names
        assert items == truth[version]
