"""`make bench-federation`: the same FedAvg workload in-process, on Flower, and on Flower with SecAgg+.

For 3, 6 and 12 merchants (the embedded shop log; 6 is its natural split, 3 and 12 come from the
quantity partitioner) it trains ROUNDS rounds (no early stopping) in each runtime and records
seconds per round, the payload bytes the coordinator sends and receives per round, peak RSS of
the coordinator and of one node's ClientApp, and the final test recall@20. The networked runs
use real processes on loopback with TLS and node authentication (training/federation_demo).
Results: results/bench-federation.json and .md.

    python -m fedrec.training.bench_federation [--merchants 3,6,12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import time
from pathlib import Path

from fedrec.atomic import write_json, write_text
from fedrec.config import load_config, parse_sets
from fedrec.evaluation import evaluate_test_all
from fedrec.features import build_item_features
from fedrec.federated.simulation import run_federated
from fedrec.model import item_embeddings, tower_state
from fedrec.training.cli import default_config_path
from fedrec.training.data import load_dataset
from fedrec.training.federation_demo import run_demo, stop_on_sigterm

RESULTS = Path("results")


def partition_sets(n: int) -> list[str]:
    return [] if n == 6 else ["data.partition=quantity", f"data.partition_merchants={n}"]


def inprocess(n: int, rounds: int) -> dict:
    sets = [
        *partition_sets(n),
        f"federation.rounds={rounds}",
        "federation.patience=0",
        "federation.refit=false",
        "federation.aggregation=fedavg",
    ]  # the message the committed results measured
    cfg = load_config(default_config_path("synthetic"), parse_sets(sets))
    ds = load_dataset(cfg.data, cfg.federation.seed)
    features = build_item_features(ds.items, cfg.model.hash_buckets)
    res = run_federated(ds, features, cfg.model, cfg.local, cfg.federation)
    vecs = item_embeddings(res.item_state, features, cfg.model)
    test = evaluate_test_all(ds.merchants, res.user_embeddings, vecs, res.item_biases)
    tower = sum(v.numel() * 4 for v in tower_state(res.item_state).values())  # what travels
    return {
        "seconds_per_round": sum(h.seconds for h in res.history) / len(res.history),
        "bytes_per_round": None,  # nothing crosses a wire; one message would be ~2x the tower
        "tower_bytes": tower,
        "peak_rss_mb": {"coordinator": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "node": None},
        "recall@20": test["overall"]["recall@20"],
    }


def networked(n: int, rounds: int, secagg: bool, work: Path, round_timeout: float) -> dict:
    sets = [
        *partition_sets(n),
        f"federation.rounds={rounds}",
        "federation.patience=0",
        "federation.refit=false",
        "federation.aggregation=fedavg",
        "threads=1",
    ]
    sets.append(f"network.round_timeout={round_timeout}")
    if not secagg:
        sets.append("network.secagg=false")
    # the bundles depend on the partition: one work directory per merchant count
    summary = run_demo(work / f"m{n}", "synthetic", sets, timeout=3600, prepare_sets=partition_sets(n))
    hist = summary["history"]
    node_rss = [json.loads(p.read_text())["peak_rss_mb"] for p in (work / f"m{n}" / "nodes").glob("*/state/rss.json")]
    traffic = summary.get("flower", {}).get("network-traffic", {})
    return {
        "seconds_per_round": sum(h["seconds"] for h in hist) / len(hist),
        # payload the ServerApp sent and received, per exchange (train rounds, validate, finish)
        "bytes_per_round": (summary["bytes_sent"] + summary["bytes_received"]) / summary["exchanges"],
        "bytes_sent": summary["bytes_sent"],
        "bytes_received": summary["bytes_received"],
        "flower_traffic_bytes": traffic.get("total-bytes"),  # Flower's own count for the whole run
        "exchanges": summary["exchanges"],
        "peak_rss_mb": {"coordinator": summary["peak_rss_mb"], "node": max(node_rss) if node_rss else None},
        "recall@20": summary["test"]["recall@20"],
        "seconds_training": summary["seconds_training"],
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| runtime | merchants | s/round | MB/round (coordinator in+out) | peak RSS MB coord / node | recall@20 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mb = "-" if r["bytes_per_round"] is None else f"{r['bytes_per_round'] / 1e6:.1f}"
        node = r["peak_rss_mb"]["node"]
        rss = f"{r['peak_rss_mb']['coordinator']:.0f} / {'-' if node is None else f'{node:.0f}'}"
        s_round, recall = f"{r['seconds_per_round']:.2f}", f"{r['recall@20']:.4f}"
        lines.append(f"| {r['runtime']} | {r['merchants']} | {s_round} | {mb} | {rss} | {recall} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--merchants", default="3,6,12")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runtimes", default="inprocess,flower,flower_secagg")
    ap.add_argument("--workdir", type=Path, default=Path("artifacts/bench-federation"))
    ap.add_argument("--round-timeout", type=float, default=600.0, help="2 cores and 12 nodes need long exchanges")
    args = ap.parse_args(argv)
    stop_on_sigterm()
    rows = []
    for n in (int(x) for x in args.merchants.split(",")):
        for runtime in args.runtimes.split(","):
            t0 = time.perf_counter()
            if runtime == "inprocess":
                row = inprocess(n, args.rounds)
            else:
                row = networked(
                    n, args.rounds, runtime == "flower_secagg", args.workdir.resolve() / runtime, args.round_timeout
                )
            # each row keeps its own date: a partial rerun replaces only its rows (`save`)
            today = dt.date.today().isoformat()
            row = {"runtime": runtime, "merchants": n, "rounds": args.rounds, "date": today, **row}
            rows.append(row)
            save(rows, args)
            print(f"{runtime:>14} {n:>3} merchants: {row['seconds_per_round']:.2f} s/round, recall@20 "
                  f"{row['recall@20']:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)  # fmt: skip
    save(rows, args)
    print(markdown(load_rows()))


def load_rows() -> list[dict]:
    path = RESULTS / "bench-federation.json"
    return json.loads(path.read_text())["rows"] if path.is_file() else []


def save(rows: list[dict], args: argparse.Namespace) -> None:
    """Merge this run's rows into the results file by (runtime, merchants), so parts can be rerun."""
    merged = {(r["runtime"], r["merchants"]): r for r in load_rows()}
    merged.update({(r["runtime"], r["merchants"]): r for r in rows})
    order = {"inprocess": 0, "flower": 1, "flower_secagg": 2}
    rows = sorted(merged.values(), key=lambda r: (r["merchants"], order.get(r["runtime"], 9)))
    result = {
        "benchmark": "bench-federation",
        "date": dt.date.today().isoformat(),
        "command": "make bench-federation",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "workload": "embedded shop log, FedAvg, `rounds` (per row), no early stopping, loopback, TLS + node auth",
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "bench-federation.json", result)
    write_text(RESULTS / "bench-federation.md", markdown(rows))


if __name__ == "__main__":
    main()
