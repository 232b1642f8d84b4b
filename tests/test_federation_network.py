"""The networked runtime for real: a coordinator and merchant nodes as processes on loopback.

TLS and node authentication are on. One federation (3 merchants: the smallest shops of the
embedded log, to keep CI short) serves every test; each test launches a run on it. Every process
is started in its own group and stopped by PID at the end (training/federation_demo.Processes).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from flwr.common import bytes_to_ndarray

from fedrec.config import load_config
from fedrec.data import FederatedDataset
from fedrec.evaluation import evaluate_test_all
from fedrec.features import build_item_features
from fedrec.federated.credentials import make_node_key, make_tls
from fedrec.federated.merchant_node import load_bundle, write_bundles
from fedrec.federated.simulation import run_federated
from fedrec.model import item_embeddings
from fedrec.privacy.accountant import plan_mechanism
from fedrec.training.cli import default_config_path
from fedrec.training.data import load_dataset
from fedrec.training.federation import flower_env, write_flwr_config
from fedrec.training.federation_demo import (
    FEDREC,
    Processes,
    free_port,
    register_node,
    start_coordinator,
    start_node,
    wait_for_run,
)

pytestmark = pytest.mark.network
MERCHANTS = 3  # started with the federation; a 4th bundle is for tests that add a node


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    work = tmp_path_factory.mktemp("federation")
    cfg = load_config(default_config_path("synthetic"))
    ds = load_dataset(cfg.data, cfg.federation.seed)
    small = sorted(ds.merchants, key=lambda m: m.train.nnz)[: MERCHANTS + 1]
    sub = FederatedDataset(ds.name, ds.items, [m for m in ds.merchants if m in small], ds.protocol)
    *bundles, spare = write_bundles(sub, work / "bundles")
    creds = work / "creds"
    make_tls(creds)
    for b in bundles:
        make_node_key(creds / "keys", b.name)
    make_node_key(creds / "keys", "intruder")
    make_node_key(creds / "keys", spare.name)
    procs = Processes()
    try:
        port = free_port()
        superlink = f"127.0.0.1:{port}"
        db = work / "coordinator" / "superlink.db"
        link = start_coordinator(procs, creds, db, port, work / "logs" / "coordinator.log")
        home = work / "flwr-home"
        write_flwr_config(home, superlink, creds / "ca.crt")
        env = {**flower_env(), "FLWR_HOME": str(home)}
        for b in bundles:
            register_node(creds / "keys" / f"{b.name}.pub", env)
        nodes = {}
        for name, bundle in [*((b.name, b) for b in bundles), ("intruder", bundles[0])]:
            node_dir = work / "nodes" / name
            nodes[name] = start_node(
                procs, name, bundle, creds, superlink, node_dir / "state", node_dir / "artifacts", work / "logs"
            )
        yield {
            "work": work, "superlink": superlink, "port": port, "db": db, "creds": creds,
            "bundles": bundles, "spare": spare, "procs": procs, "nodes": nodes, "link": link, "env": env,
            "cfg": cfg, "dataset": FederatedDataset(ds.name, ds.items, sub.merchants[:MERCHANTS], ds.protocol),
            "registered": {b.name for b in bundles},
        }  # fmt: skip
    finally:
        procs.stop_all()


def _start_node(fed: dict, bundle: Path, env: dict | None = None, register: bool = False):  # noqa: ANN202
    name, node_dir = bundle.name, fed["work"] / "nodes" / bundle.name
    if register and name not in fed["registered"]:  # once per key: whichever test starts the node first
        register_node(fed["creds"] / "keys" / f"{name}.pub", fed["env"])
        fed["registered"].add(name)
    return start_node(
        fed["procs"], name, bundle, fed["creds"], fed["superlink"],
        node_dir / "state", node_dir / "artifacts", fed["work"] / "logs", env,
    )  # fmt: skip


# The fault tests send the smaller fedavg message (no per-row terms): what they test does not depend
# on the rule, and SecAgg+ time grows with the message. The secagg and plaintext runs train with the
# default (auto).
FEDAVG = "federation.aggregation=fedavg"


def _start_run(fed: dict, name: str, *sets: str):  # noqa: ANN202
    workdir = fed["work"] / name
    cmd = [
        *FEDREC, "run", "--workdir", str(workdir), "--catalogue", str(fed["bundles"][0] / "catalogue.parquet"),
        "--ca", str(fed["creds"] / "ca.crt"), "--superlink", fed["superlink"],
        "--record-dir", str(workdir / "received"),
        "--set", "threads=1",
    ]  # fmt: skip
    if not any(x.startswith("federation.rounds=") for x in sets):
        cmd += ["--set", "federation.rounds=1"]
    # The refit's extra rounds are tested where they are asked for (the restart test) and, round
    # for round against the in-process refit, in test_wire; elsewhere they would only add time.
    if not any(x.startswith("federation.refit=") for x in sets):
        cmd += ["--set", "federation.refit=false"]
    # The library's default rule, auto (rowwise here, whose per-row weights n_k 1[sold] only SecAgg+
    # hides), not the synthetic config's fedavg: the harder case for the masking and the leak tests.
    if not any(x.startswith("federation.aggregation=") for x in sets):
        cmd += ["--set", "federation.aggregation=auto"]
    for s in sets:
        cmd += ["--set", s]
    return fed["procs"].start(name, cmd, fed["work"] / "logs" / f"{name}.log"), workdir


def _run(fed: dict, name: str, *sets: str, timeout: float = 240) -> dict:
    proc, workdir = _start_run(fed, name, *sets)
    log_path = fed["work"] / "logs" / f"{name}.log"
    try:
        summary = wait_for_run(
            proc, log_path, workdir, {**fed["env"], "FLWR_HOME": str(workdir / "flwr-home")}, timeout
        )
    except RuntimeError:
        pytest.fail(log_path.read_text(errors="replace")[-3000:])
    proc.wait(30)  # the log stream ends with the run
    return {"summary": summary, "workdir": workdir, "log": log_path.read_text(errors="replace")}


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
    assert card["federation"]["aggregation"] == "rowwise"  # the default (auto) as used, under SecAgg+
    assert (export / "index.faiss").is_file()
    for b in federation["bundles"]:
        mine = federation["work"] / "nodes" / b.name / "artifacts" / "merchants" / b.name / s["version"]
        assert mine.is_dir()
        # each node chose its served popularity weight at finish, on its own validation slice
        served = json.loads((mine / "served_weight.json").read_text())
        assert f"{served['popularity_weight']:g}" in served["validation"]
    auc = _leakage_auc(federation, out["workdir"] / "received")
    assert abs(auc - 0.5) < 0.1, auc  # at chance: a masked vector looks uniform
    federation["secagg_recall"] = s["test"]["recall@20"]


def test_plaintext_run_leaks_what_secagg_hides(federation) -> None:
    out = _run(federation, "plaintext", "network.secagg=false")
    auc = _leakage_auc(federation, out["workdir"] / "received")
    assert auc > 0.9, auc  # the merchant's sold set stands out by row norm
    card = json.loads((out["workdir"] / "exports" / out["summary"]["version"] / "model_card.json").read_text())
    assert card["privacy"]["secure_aggregation"] is False
    # The same training in-process (same seeds, config and merchants, no dropouts) gives the same
    # model: only float summation order differs, so the tolerance is 1e-3 of recall@20.
    ds = federation["dataset"]
    cfg = load_config(
        default_config_path("synthetic"),
        {"federation.rounds": 1, "federation.refit": False, "threads": 1, "federation.aggregation": "auto"},
    )
    features = build_item_features(ds.items, cfg.model.hash_buckets)
    res = run_federated(ds, features, cfg.model, cfg.local, cfg.federation)
    vecs = item_embeddings(res.item_state, features, cfg.model)
    inproc = evaluate_test_all(ds.merchants, res.user_embeddings, vecs, res.item_biases)["overall"]["recall@20"]
    assert abs(out["summary"]["test"]["recall@20"] - inproc) < 1e-3, (out["summary"]["test"], inproc)
    if "secagg_recall" in federation:  # quantisation noise only: the same model within noise
        assert abs(out["summary"]["test"]["recall@20"] - federation["secagg_recall"]) < 0.01


# One SecAgg+ round, but the fixture's start-up and the two in-process runs make it a minute or
# more: `-m slow`. In CI: the bound by hand and its refusals (tests/test_poisoning.py), in the
# `delta_from_sums` that both runtimes call.
@pytest.mark.slow
def test_the_sum_clip_runs_under_secagg_like_in_process(federation) -> None:
    """federation.sum_clip reads only the sum SecAgg+ decodes: the coordinator's tower after the
    round is the in-process one with the same bound (up to SecAgg+'s quantisation), and the bound
    binds (the unbounded tower is much further away)."""
    out = _run(federation, "sumclip", "federation.sum_clip=2")
    networked = torch.load(out["workdir"] / "checkpoint.pt", weights_only=False)["state"]
    ds = federation["dataset"]

    def in_process(bound: float) -> dict[str, torch.Tensor]:
        sets = {"federation.rounds": 1, "federation.refit": False, "threads": 1, "federation.aggregation": "auto"}
        cfg = load_config(default_config_path("synthetic"), {**sets, "federation.sum_clip": bound})
        features = build_item_features(ds.items, cfg.model.hash_buckets)
        return run_federated(ds, features, cfg.model, cfg.local, cfg.federation).item_state

    bounded, plain = in_process(2.0), in_process(0.0)
    for k, v in networked.items():  # the tower (the in-process state adds the content match's blocks)
        gap = float((bounded[k] - v).abs().max())
        assert gap < 1e-3, (k, gap)
    # well above the tolerance (0.0056 on 2026-12-07): a coordinator that ignored the bound fails above
    table = "item_emb.weight"
    assert float((plain[table] - bounded[table]).abs().max()) > 3e-3


def _in_process_test_recall(ds: FederatedDataset, cfg) -> float:  # noqa: ANN001
    """Test recall@20 of the same DP run in-process (the same seeds draw the same noise)."""
    features = build_item_features(ds.items, cfg.model.hash_buckets)
    mech = plan_mechanism(cfg.privacy, cfg.federation.rounds, cfg.local.epochs)
    res = run_federated(ds, features, cfg.model, cfg.local, cfg.federation, dp=mech)
    vecs = item_embeddings(res.item_state, features, cfg.model)
    return evaluate_test_all(ds.merchants, res.user_embeddings, vecs, res.item_biases)["overall"]["recall@20"]


# Two minutes of CI for one DP round (three SecAgg+ exchanges), so `-m slow` only. Its parts stay in
# CI: the split mechanism, its accounting and a split delta inside SecAgg+'s range in
# test_distributed_dp, and DP replies through SecAgg+'s quantiser in test_wire.
@pytest.mark.slow
def test_split_noise_dp_runs_under_secagg_like_in_process(federation) -> None:
    """Distributed DP on the networked runtime: the card certifies the sum, and the model is the
    in-process one (the same per-merchant seeds draw the same noise shares) within SecAgg+'s
    quantisation, a tolerance of 0.01 recall@20 as between SecAgg+ and plaintext. With the refit
    on, both train on train + validation from the first round (`trains_on_validation`). One round:
    a second one repeats the same exchange and took a minute of CI."""
    sets = {"privacy.epsilon": 8, "privacy.noise_split": 3, "federation.server.name": "fedadam",
            "federation.server.lr": 0.01, "federation.rounds": 1, "federation.refit": "true"}  # fmt: skip
    out = _run(federation, "split-dp", *(f"{k}={v}" for k, v in sets.items()))
    card = json.loads((out["workdir"] / "exports" / out["summary"]["version"] / "model_card.json").read_text())
    dp = card["privacy"]["differential_privacy"]
    assert (dp["noise_split"], dp["steps_per_round"], dp["rounds"]) == (3, 1, 1)
    assert 0 < dp["epsilon"] <= 8 < dp["epsilon_if_other_merchants_collude"]
    assert card["privacy"]["secure_aggregation"]["protocol"].startswith("SecAgg+")
    ds = federation["dataset"]
    cfg = load_config(default_config_path("synthetic"), {**sets, "federation.refit": True, "threads": 1})
    assert card["refit_rounds"] == 1  # the DP round, on train + validation
    # so the nodes have no validation slice: the coordinator's validation sums hold no customer
    assert all(math.isnan(h["val_recall_at_20_previous_round"]) for h in card["history"]) and card["history"]
    inproc = _in_process_test_recall(ds, cfg)
    assert abs(out["summary"]["test"]["recall@20"] - inproc) < 0.01, (out["summary"]["test"], inproc)


# Like the split DP-SGD test above: about two minutes of CI for one round, so `-m slow` only. Its math
# is in CI without processes (tests/test_wire.py, test_dp_als_over_the_wire_equals_the_in_process_runtime).
@pytest.mark.slow
def test_dp_als_runs_under_secagg_like_in_process(federation) -> None:
    """DP-ALS on the networked runtime: the nodes' clipped, noised item-step sums go through SecAgg+,
    the coordinator solves the table, each node re-solves its customers and keeps its count bias;
    the card certifies the mechanism, and test recall@20 is the in-process one within 0.01 (the
    tolerance of the split DP-SGD test: SecAgg+'s rounding)."""
    sets = {"privacy.epsilon": 8, "privacy.mechanism": "als", "local.loss": "ials", "local.ials_item_step": "exact",
            "federation.aggregation": "auto",
            "local.temperature": 1, "model.use_content": False, "model.merchant_item_bias": True,
            "model.dim": 16, "privacy.clip": 0.03, "local.user_solve_reg": 10, "privacy.count_share": 0.3,
            "privacy.noise_split": 3, "federation.rounds": 1, "federation.refit": True}  # fmt: skip
    out = _run(federation, "dp-als", *(f"{k}={json.dumps(v)}" for k, v in sets.items()))
    card = json.loads((out["workdir"] / "exports" / out["summary"]["version"] / "model_card.json").read_text())
    dp = card["privacy"]["differential_privacy"]
    assert (dp["mechanism"], dp["noise_split"], dp["count_share"], dp["rounds"]) == ("als", 3, 0.3, 1)
    assert 0 < dp["epsilon"] <= 8
    ds = federation["dataset"]
    cfg = load_config(default_config_path("synthetic"), {**sets, "threads": 1})
    inproc = _in_process_test_recall(ds, cfg)
    assert abs(out["summary"]["test"]["recall@20"] - inproc) < 0.01, (out["summary"]["test"], inproc)


# About three minutes (six SecAgg+ exchanges), so `-m slow` only; the same path without processes
# is in CI (tests/test_wire.py, test_the_popularity_prior_over_the_wire_is_the_in_process_choice).
@pytest.mark.slow
def test_a_large_catalogue_chooses_its_popularity_prior_over_secagg(federation) -> None:
    """The switch lowered to 1,000 products makes the shop's catalogue "large": the coordinator
    chooses the prior from the merchants' secure sums, the card records it, and the run's weight
    and test recall@20 are the in-process ones (within 0.01, SecAgg+'s rounding)."""
    sets = {"federation.rounds": 1, "federation.refit": True, "federation.aggregation": "auto",
            "local.full_softmax_max_items": 1000,
            "local.sampled_popularity_weights": [0.1, 1.0]}  # fmt: skip
    out = _run(federation, "prior", *(f"{k}={json.dumps(v)}" for k, v in sets.items()), timeout=400)
    card = json.loads((out["workdir"] / "exports" / out["summary"]["version"] / "model_card.json").read_text())
    ds = federation["dataset"]
    cfg = load_config(default_config_path("synthetic"), {**sets, "threads": 1})
    features = build_item_features(ds.items, cfg.model.hash_buckets)
    res = run_federated(ds, features, cfg.model, cfg.local, cfg.federation)
    assert card["popularity_prior"]["weight"] == res.popularity.weight
    assert "secure sum" in card["popularity_prior"]["counts"]
    vecs = item_embeddings(res.item_state, features, cfg.model)
    inproc = evaluate_test_all(ds.merchants, res.user_embeddings, vecs, res.item_biases)["overall"]["recall@20"]
    assert abs(out["summary"]["test"]["recall@20"] - inproc) < 0.01, (out["summary"]["test"], inproc)


def _wait_for(path: Path, text: str, timeout: float, proc=None) -> bool:  # noqa: ANN001
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.is_file() and text in path.read_text(errors="replace"):
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.3)
    return False


def test_bad_update_from_a_node_is_rejected_and_the_round_goes_on(federation) -> None:
    """A 4th node sends NaN in its train reply (bypassing its own checks, as a broken node would).

    Plaintext: the coordinator sees each reply, drops that one with the node's id in the log, and
    the round goes on with the 3 valid ones. (Under SecAgg+ it would see only a non-finite sum.)
    """
    fed = federation
    env = {**flower_env(), "FEDREC_TEST_FAULT": "nan"}
    bad = _start_node(fed, fed["spare"], env=env, register=True)
    try:
        assert _wait_for(fed["work"] / "logs" / f"node-{fed['spare'].name}.log", "SuperNode ID", 30, bad)
        out = _run(fed, "nan-fault", "network.secagg=false", FEDAVG)
        bad_id = _node_id(fed, fed["spare"].name)
        assert f"rejected the update of node {bad_id}" in out["log"] and "NaN" in out["log"]
        assert out["summary"]["history"][0]["merchants"] == 3  # the 3 valid replies made the round
        assert out["summary"]["test"]["recall@20"] > 0.05
    finally:
        fed["procs"].stop(bad)


# 212 s in the clean-clone CI of 2026-12-06 evening (twice its earlier time, the machine's process
# start-up that hour), which took the run past 20 minutes: under -m slow with the restart test.
# Put back in CI beside the other tests (tests/run.sh) on 2026-12-07, the two took the clean-clone
# CI from 12.9 to 17.0 minutes (170 s and 156 s here; the other tests yield the CPU to the federation).
@pytest.mark.slow
def test_merchant_killed_mid_round_then_rejoins_with_its_state(federation) -> None:
    """SecAgg+ with 4 merchants: one is killed right after sending its masked vector in round 1.

    The round completes from the other nodes' key shares; the killed merchant restarts (same key,
    same state directory) and answers the next exchange from the state it saved in round 1.
    """
    fed = federation
    spare = fed["spare"]
    log = fed["work"] / "logs" / f"node-{spare.name}.log"
    # registered here too: run alone (-k), no earlier test has registered the spare's key
    node = _start_node(fed, spare, register=True)
    assert _wait_for(log, "SuperNode ID", 30, node)
    proc, workdir = _start_run(fed, "kill-merchant", "network.secagg=true", "network.round_timeout=45", FEDAVG)
    assert _wait_for(log, f"merchant {spare.name}: train round 1 answered", 150, proc)
    time.sleep(1.0)  # its masked vector is on its way; the unmask stage follows without it
    fed["procs"].stop(node, grace=1)
    state_root = fed["work"] / "nodes" / spare.name / "state"
    saved = sorted(state_root.glob("run-*/round-0001.pt"))
    assert saved, "the merchant saved its round-1 state before answering"
    before = torch.load(saved[0], weights_only=True)["users"]
    node = _start_node(fed, spare)  # rejoins: same key, same state directory
    try:
        env = {**fed["env"], "FLWR_HOME": str(workdir / "flwr-home")}
        summary = wait_for_run(proc, fed["work"] / "logs" / "kill-merchant.log", workdir, env, 300)
        assert summary["history"][0]["round"] == 1 and summary["history"][0]["merchants"] >= 3
        assert summary["test"]["recall@20"] > 0.05
        torch.testing.assert_close(torch.load(saved[0], weights_only=True)["users"], before)
        node_log = log.read_text(errors="replace")
        assert "answered" in node_log.rsplit("SuperNode ID", 1)[1], "the restarted node took part again"
    finally:
        fed["procs"].stop(node)


def _checkpoint_round(path: Path) -> int:
    try:
        return int(torch.load(path, weights_only=False)["round"])
    except (OSError, EOFError, RuntimeError, KeyError):
        return 0


# Two runs and the refit's rounds: 85 s on the 2-core machine since replies are pulled every 0.1 s,
# but 171 s in the clean-clone CI of 2026-12-06 evening, which with the kill test took the run past
# 20 minutes: under -m slow again; the bad-update and SecAgg+ fault tests stay in CI.
@pytest.mark.slow
def test_coordinator_restart_resumes_without_losing_or_repeating_a_round(federation) -> None:
    """Kill the coordinator (SuperLink, with its ServerApp) after round 1; restart it; run again."""
    fed = federation
    proc, workdir = _start_run(
        fed, "restart", "network.secagg=false", "federation.rounds=2", "federation.refit=true", FEDAVG
    )
    ck = workdir / "checkpoint.pt"
    end = time.monotonic() + 150
    while _checkpoint_round(ck) < 1 and time.monotonic() < end and proc.poll() is None:
        time.sleep(0.5)
    assert _checkpoint_round(ck) >= 1, (fed["work"] / "logs" / "restart.log").read_text(errors="replace")[-3000:]
    fed["procs"].stop(fed["link"], grace=5)  # the coordinator dies mid-run (SIGTERM to its group)
    fed["procs"].stop(proc, grace=5)
    before = torch.load(ck, weights_only=False)
    assert not (workdir / "last_run.json").exists()

    start_coordinator(
        fed["procs"], fed["creds"], fed["db"], fed["port"], fed["work"] / "logs" / "coordinator-restarted.log"
    )
    out = _run(
        fed, "restart", "network.secagg=false", "federation.rounds=2", "federation.refit=true", FEDAVG, timeout=300
    )
    after = torch.load(ck, weights_only=False)
    rounds = [h["round"] for h in after["history"]]
    assert rounds == [1, 2], rounds  # none lost, none repeated
    assert after["run_key"] == before["run_key"]  # the merchants kept their private state
    assert after["history"][: before["round"]] == before["history"]
    assert "resuming after round" in out["log"]
    # then the refit on train + validation ran for the chosen rounds, once each, and was released
    best = after["best_round"]
    assert best >= 1 and after["refit_round"] == best == out["summary"]["refit_rounds"]
    assert [h["round"] for h in after["refit_history"]] == list(range(1, best + 1))
    export = out["workdir"] / "exports" / out["summary"]["version"]
    assert (export / "index.faiss").is_file() and (out["workdir"] / "exports" / "LATEST").is_file()
    assert out["summary"]["test"]["recall@20"] > 0.05
    # the shared export holds the refit's item tower (the merchants' halves hold its user tables)
    shipped = torch.load(export / "item_tower.pt", weights_only=False)["state_dict"]
    for k, v in after["refit_state"].items():
        assert torch.equal(shipped[k], v), k
    assert any(not torch.equal(after["best_state"][k], v) for k, v in after["refit_state"].items())
