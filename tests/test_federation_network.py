"""The networked runtime for real: a coordinator and merchant nodes as processes on loopback.

TLS and node authentication are on. One federation (3 merchants: the smallest shops of the
embedded log, to keep CI short) serves every test; each test launches a run on it. Every process
is started in its own group and stopped by PID at the end (training/federation_demo.Processes).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
from flwr.common import bytes_to_ndarray

from fedrec.config import load_config
from fedrec.data import FederatedDataset
from fedrec.federated.credentials import make_node_key, make_tls
from fedrec.federated.merchant_node import load_bundle, write_bundles
from fedrec.training.cli import default_config_path
from fedrec.training.data import load_dataset
from fedrec.training.federation import CONNECTION, flower_bin, flower_env, write_flwr_config
from fedrec.training.federation_demo import FEDREC, Processes, free_port, wait_for_port

pytestmark = pytest.mark.network
MERCHANTS = 3


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("federation")
    cfg = load_config(default_config_path("synthetic"))
    ds = load_dataset(cfg.data, cfg.federation.seed)
    small = sorted(ds.merchants, key=lambda m: m.train.nnz)[:MERCHANTS]
    sub = FederatedDataset(ds.name, ds.items, [m for m in ds.merchants if m in small], ds.protocol)
    bundles = write_bundles(sub, work / "bundles")
    creds = work / "creds"
    make_tls(creds)
    for b in bundles:
        make_node_key(creds / "keys", b.name)
    make_node_key(creds / "keys", "intruder")
    procs = Processes()
    try:
        port = free_port()
        superlink = f"127.0.0.1:{port}"
        db = work / "coordinator" / "superlink.db"
        link = procs.start(
            "coordinator",
            [*FEDREC, "coordinator", "--certs", str(creds), "--state", str(db), "--port", str(port)],
            work / "logs" / "coordinator.log",
        )
        wait_for_port(port, link)
        home = work / "flwr-home"
        write_flwr_config(home, superlink, creds / "ca.crt")
        env = {**flower_env(), "FLWR_HOME": str(home)}
        for b in bundles:
            key = creds / "keys" / f"{b.name}.pub"
            subprocess.run([flower_bin("flwr"), "supernode", "register", str(key), CONNECTION], env=env, check=True)
        nodes = {}
        for b in [*bundles, bundles[0].with_name("intruder")]:
            name = b.name
            bundle = bundles[0] if name == "intruder" else b
            nodes[name] = procs.start(
                f"node {name}",
                [
                    *FEDREC, "node", "--bundle", str(bundle), "--state-dir", str(work / "nodes" / name / "state"),
                    "--artifacts", str(work / "nodes" / name / "artifacts"), "--key", str(creds / "keys" / name),
                    "--ca", str(creds / "ca.crt"), "--superlink", superlink, "--port", str(free_port()),
                ],
                work / "logs" / f"node-{name}.log",
            )  # fmt: skip
        yield {"work": work, "superlink": superlink, "creds": creds, "bundles": bundles, "procs": procs, "nodes": nodes}
    finally:
        procs.stop_all()


def _run(fed: dict, name: str, *sets: str, timeout: float = 240) -> dict:
    workdir = fed["work"] / name
    cmd = [
        *FEDREC, "run", "--workdir", str(workdir), "--catalogue", str(fed["bundles"][0] / "catalogue.parquet"),
        "--ca", str(fed["creds"] / "ca.crt"), "--superlink", fed["superlink"],
        "--record-dir", str(workdir / "received"),
        "--set", "federation.rounds=1", "--set", "threads=1",
    ]  # fmt: skip
    for s in sets:
        cmd += ["--set", s]
    proc = fed["procs"].start(name, cmd, fed["work"] / "logs" / f"{name}.log")
    proc.wait(timeout)
    log = (fed["work"] / "logs" / f"{name}.log").read_text(errors="replace")
    assert proc.returncode == 0 and (workdir / "last_run.json").is_file(), log[-3000:]
    return {"summary": json.loads((workdir / "last_run.json").read_text()), "workdir": workdir, "log": log}


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    ranks = scipy.stats.rankdata(scores)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _node_id(fed: dict, name: str) -> str:
    log = (fed["work"] / "logs" / f"node-{name}.log").read_text(errors="replace")
    return log.split("SuperNode ID: ", 1)[1].split()[0]


def _leakage_auc(fed: dict, received: Path, merchant: int = 0) -> float:
    """The honest-but-curious coordinator: rank the item rows of one merchant's reply by norm.

    It gets every reply that merchant's node sent in round 1 (under SecAgg+: key shares,
    ciphertexts and the masked vector; without it: the plain sums) and scores each item by the
    norm of its row in any item-table-shaped array, against the items that merchant really sold.
    """
    bundle = fed["bundles"][merchant]
    b = load_bundle(bundle)
    sold = np.asarray(b.merchant.train.sum(axis=0)).ravel() > 0
    n_items = b.items.height
    aucs = []
    for f in sorted(received.glob(f"node{_node_id(fed, bundle.name)}-round1-*.npz")):
        data = np.load(f, allow_pickle=True)
        for key in data.files:
            if key.startswith("config/") and not key.endswith("masked_params"):
                continue  # key shares and ciphertexts: not arrays
            arrays = [bytes_to_ndarray(x) for x in data[key]] if key.startswith("config/") else [data[key]]
            for arr in arrays:
                if arr.ndim == 2 and arr.shape[0] == n_items and arr.shape[1] > 1:
                    rows = arr.astype(np.float64)
                    aucs.append(_auc(np.linalg.norm(rows - rows.mean(0), axis=1), sold))
    assert aucs, f"no item-table array among what the coordinator received in {received}"
    return max(aucs, key=lambda a: abs(a - 0.5))  # the attacker's best shot over every reply


def test_unregistered_node_is_refused(federation) -> None:
    """A node whose public key the operator never registered cannot join: it exits, the coordinator logs why."""
    proc = federation["nodes"]["intruder"]
    proc.wait(90)
    assert proc.returncode not in (0, None)
    node_log = (federation["work"] / "logs" / "node-intruder.log").read_text(errors="replace")
    assert "Failed to activate SuperNode" in node_log, node_log[-2000:]
    link_log = (federation["work"] / "logs" / "coordinator.log").read_text(errors="replace")
    assert "No SuperNode found with the given public key" in link_log
    for name, p in federation["nodes"].items():  # the registered ones are still up
        assert name == "intruder" or p.poll() is None, name


def test_secagg_run_trains_and_hides_each_merchant(federation) -> None:
    out = _run(federation, "secagg")
    s = out["summary"]
    assert s["test"]["recall@20"] > 0.05
    export = out["workdir"] / "exports" / s["version"]
    card = json.loads((export / "model_card.json").read_text())
    assert card["privacy"]["secure_aggregation"]["protocol"].startswith("SecAgg+")
    assert (export / "index.faiss").is_file()
    for b in federation["bundles"]:
        assert (federation["work"] / "nodes" / b.name / "artifacts" / "merchants" / b.name / s["version"]).is_dir()
    auc = _leakage_auc(federation, out["workdir"] / "received")
    assert abs(auc - 0.5) < 0.1, auc  # at chance: a masked vector looks uniform
    federation["secagg_recall"] = s["test"]["recall@20"]


def test_plaintext_run_leaks_what_secagg_hides(federation) -> None:
    out = _run(federation, "plaintext", "network.secagg=false")
    auc = _leakage_auc(federation, out["workdir"] / "received")
    assert auc > 0.9, auc  # the merchant's sold set stands out by row norm
    card = json.loads((out["workdir"] / "exports" / out["summary"]["version"] / "model_card.json").read_text())
    assert card["privacy"]["secure_aggregation"] is False
    if "secagg_recall" in federation:  # quantisation noise only: the same model within noise
        assert abs(out["summary"]["test"]["recall@20"] - federation["secagg_recall"]) < 0.01
