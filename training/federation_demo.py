"""`make federation-demo`: a whole federation on loopback, with TLS, node authentication and SecAgg+.

Starts one coordinator (flower-superlink) and one node per merchant of the embedded shop log
(flower-supernode, each with its own bundle, state directory and key), registers the nodes'
keys, launches the run (flwr run), prints the final recall@20, and stops every process it
started: by the PID it got when starting it (each in its own process group, so Flower's helper
processes go too), on success, on failure and on Ctrl-C alike.

    python -m fedrec.training.federation_demo [--rounds N] [--plaintext] [--refit] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedrec.atomic import write_json
from fedrec.config import load_config, parse_sets
from fedrec.federated.credentials import make_node_key, make_tls
from fedrec.federated.merchant_node import write_bundles
from fedrec.training.cli import default_config_path
from fedrec.training.data import load_dataset
from fedrec.training.federation import CONNECTION, flower_bin, flower_env, write_flwr_config

FEDREC = [sys.executable, "-m", "fedrec.training.cli", "federation"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on port {port} after {timeout:.0f}s")


class Processes:
    """Every process the demo started, stopped by PID (its process group) in `stop_all`."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def start(self, name: str, cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):  # helpers left in the group
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for _, proc in reversed(self.procs):
            self.stop(proc)
        groups = {proc.pid for _, proc in self.procs}
        for _ in range(3):  # a helper spawned while its parent was stopping: find it by group, kill it
            strays = [pid for pid, pgid in _process_groups() if pgid in groups and pid != os.getpid()]
            if not strays:
                return
            for pid in strays:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)


def _process_groups() -> list[tuple[int, int]]:
    """(pid, process group) of every process we can see (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            out.append((int(stat.parent.name), int(fields[2])))
    return out


def start_coordinator(procs: Processes, creds: Path, db: Path, port: int, log: Path) -> subprocess.Popen:
    """`fedrec federation coordinator` on loopback; returns once it listens."""
    cmd = [*FEDREC, "coordinator", "--certs", str(creds), "--state", str(db), "--port", str(port)]
    link = procs.start("coordinator", cmd, log)
    wait_for_port(port, link)
    return link


def register_node(public_key: Path, env: dict) -> None:
    """The operator registers a node's public key (flwr supernode register), so it may join."""
    cmd = [flower_bin("flwr"), "supernode", "register", str(public_key), CONNECTION]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def start_node(
    procs: Processes,
    name: str,
    bundle: Path,
    creds: Path,
    superlink: str,
    state_dir: Path,
    artifacts: Path,
    logs: Path,
    env: dict | None = None,
) -> subprocess.Popen:
    """`fedrec federation node` with the key `creds/keys/<name>`; its log is logs/node-<name>.log."""
    cmd = [
        *FEDREC, "node", "--bundle", str(bundle), "--state-dir", str(state_dir), "--artifacts", str(artifacts),
        "--key", str(creds / "keys" / name), "--ca", str(creds / "ca.crt"),
        "--superlink", superlink, "--port", str(free_port()),
    ]  # fmt: skip
    return procs.start(f"node {name}", cmd, logs / f"node-{name}.log", env=env)


def run_status(run_id: str, env: dict) -> dict:
    """Flower's own record of a run (`flwr ls --run-id ... --format json`): status and traffic."""
    out = subprocess.run(
        [flower_bin("flwr"), "ls", "--run-id", run_id, "--format", "json"], env=env, capture_output=True, text=True
    ).stdout
    try:
        data = json.loads(out)
    except json.JSONDecodeError:
        return {}
    stack = [data]
    while stack:  # the run's entry, wherever the JSON nests it
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("run-id") == run_id:
                return node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return {}


def wait_for_run(run: subprocess.Popen, log: Path, workdir: Path, env: dict, timeout: float) -> dict:
    """Until the ServerApp wrote its summary, or Flower says the run finished without one.

    `flwr run --stream` may end before the run does (its log stream can drop), so its exit is
    not the signal; the run's status on the coordinator is.
    """
    summary_path = workdir / "last_run.json"
    end = time.monotonic() + timeout
    run_id, status = "", {}
    while time.monotonic() < end:
        if summary_path.is_file():
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            if run_id:
                summary["flower"] = run_status(run_id, env)
            return summary
        text = log.read_text(errors="replace") if log.is_file() else ""
        if not run_id and "Successfully started run " in text:
            run_id = text.split("Successfully started run ", 1)[1].split()[0]
        if run_id and run.poll() is not None:
            status = run_status(run_id, env)
            if str(status.get("status", "")).startswith("finished") and not summary_path.is_file():
                time.sleep(2)
                if not summary_path.is_file():
                    break
        elif run.poll() not in (None, 0):
            break
        time.sleep(2)
    detail = status.get("status-details") or status.get("status") or f"exit {run.returncode}"
    raise RuntimeError(f"the run did not finish ({detail}); see {log}")


def prepare(work: Path, dataset: str, sets: list[str] = ()) -> tuple[list[Path], Path]:
    cfg = load_config(default_config_path(dataset), {"data.dataset": dataset, **parse_sets(sets)})
    bundles_dir = work / "bundles"
    if not bundles_dir.is_dir():
        write_bundles(load_dataset(cfg.data, cfg.federation.seed), bundles_dir)
    bundles = sorted(p for p in bundles_dir.iterdir() if (p / "bundle.json").is_file())
    creds = work / "credentials"
    make_tls(creds)
    for b in bundles:
        make_node_key(creds / "keys", b.name)
    return bundles, creds


def run_demo(work: Path, dataset: str, sets: list[str], timeout: float, prepare_sets: list[str] = ()) -> dict:
    """The whole demo; `prepare_sets` are data settings for the bundles (e.g. another partition)."""
    for stale in ("coordinator", "nodes", "logs"):
        shutil.rmtree(work / stale, ignore_errors=True)
    bundles, creds = prepare(work, dataset, list(prepare_sets))
    procs = Processes()
    try:
        port = free_port()
        superlink = f"127.0.0.1:{port}"
        t0 = time.perf_counter()
        start_coordinator(procs, creds, work / "coordinator" / "superlink.db", port, work / "logs" / "coordinator.log")
        home = work / "coordinator" / "flwr-home"
        write_flwr_config(home, superlink, creds / "ca.crt")
        env = {**flower_env(), "FLWR_HOME": str(home)}
        for b in bundles:
            register_node(creds / "keys" / f"{b.name}.pub", env)
        for b in bundles:
            node_dir = work / "nodes" / b.name
            start_node(procs, b.name, b, creds, superlink, node_dir / "state", work / "artifacts", work / "logs")
        print(f"coordinator on {superlink} (TLS, node authentication); {len(bundles)} merchant nodes", flush=True)
        run_cmd = [
            *FEDREC, "run", "--workdir", str(work / "coordinator"),
            "--catalogue", str(bundles[0] / "catalogue.parquet"),
            "--ca", str(creds / "ca.crt"), "--superlink", superlink, "--dataset", dataset,
        ]  # fmt: skip
        for s in sets:
            run_cmd += ["--set", s]
        t_run = time.perf_counter()
        run = procs.start("run", run_cmd, work / "logs" / "run.log")
        summary = wait_for_run(run, work / "logs" / "run.log", work / "coordinator", env, timeout)
        summary["seconds_training"] = round(time.perf_counter() - t_run, 1)
        summary["seconds_total"] = round(time.perf_counter() - t0, 1)
        return summary
    finally:
        procs.stop_all()


def save_summary(path: Path, summary: dict, command: str) -> None:
    """The run's summary (the ServerApp's `last_run.json` plus the demo's timings) as a results
    file naming the command that made it, written atomically."""
    write_json(path, {"command": command, "date": dt.date.today().isoformat(), **summary})


def stop_on_sigterm() -> None:
    """SIGTERM (and SIGINT, which a shell's background job ignores) unwind through `finally`,
    so the processes the demo started are stopped rather than orphaned."""

    def _exit(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _exit)
    signal.signal(signal.SIGINT, _exit)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("artifacts/federation-demo"))
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--rounds", type=int, default=0, help="0 = the config's default")
    ap.add_argument("--plaintext", action="store_true", help="SecAgg+ off (the coordinator sees each update)")
    ap.add_argument(
        "--refit",
        action="store_true",
        help="then retrain on train + validation for the chosen rounds (twice as long); with privacy set, the "
        "one DP run trains on train + validation instead (no longer)",
    )
    ap.add_argument("--set", action="append", default=[], dest="sets")
    ap.add_argument("--timeout", type=float, default=3600.0)
    ap.add_argument("--results", type=Path, help="also write the run's summary to this JSON file")
    args = ap.parse_args(argv)
    sets = list(args.sets)
    if args.rounds:
        sets.append(f"federation.rounds={args.rounds}")
    if args.plaintext:
        sets.append("network.secagg=false")
    if not args.refit:  # a demo: the early-stopped model is released, as with federation.refit=false
        sets.append("federation.refit=false")
    stop_on_sigterm()
    try:
        summary = run_demo(args.workdir.resolve(), args.dataset, sets, args.timeout)
    except (RuntimeError, TimeoutError, subprocess.SubprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every process the demo started was stopped", file=sys.stderr)
        return 130
    if args.results:
        command = " ".join(["python -m fedrec.training.federation_demo", *(argv or sys.argv[1:])])
        try:
            save_summary(args.results, summary, command)
        except OSError as exc:  # the run itself finished: its export is in the workdir
            print(f"error: cannot write --results {args.results}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    print(
        f"final test recall@20 {summary['test']['recall@20']:.4f} (best round {summary['best_round']} of "
        f"{summary['rounds']}, refit rounds {summary.get('refit_rounds', 0)}); "
        f"training took {summary['seconds_training']}s; export {summary['version']} "
        f"in {args.workdir / 'coordinator' / 'exports'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
