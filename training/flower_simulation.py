"""fedrec's own ServerApp and ClientApp in Flower's simulation engine (Ray), for the side-by-side
with the in-process runtime in `make bench-train` (part `flower_simulation`).

Nothing here is a second copy of the federation: the server side is `run_coordinator` (the
networked ServerApp's loop) and the client side is `MerchantClient` (the networked ClientApp).
Only the wiring differs. `run_simulation` gives a ServerApp an empty run config and each virtual
node only its partition id, so `simulate` writes one bundle per merchant and passes the paths in
the environment, which the Ray workers inherit; the wrappers read it there.

Needs Flower's simulation extra (`ray`), which fedrec does not install by default:
`make simulation-setup` installs it from its own hash-pinned lock.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from flwr.client import ClientApp
from flwr.common import Context
from flwr.server import ServerApp

ENV = "FEDREC_FLOWER_SIMULATION"  # JSON: workdir, catalogue, bundles (one path per partition), config


def _settings() -> dict:
    raw = os.environ.get(ENV)
    if not raw:
        raise RuntimeError(f"{ENV} is not set: start the simulation with fedrec.training.flower_simulation.simulate")
    return json.loads(raw)


server_app = ServerApp()


@server_app.main()
def _server_main(grid, context: Context) -> None:  # noqa: ANN001
    from fedrec.config import config_from_dict
    from fedrec.training.flower_server import run_coordinator

    env = _settings()
    workdir = Path(env["workdir"])
    summary = run_coordinator(grid, context, config_from_dict(env["config"]), workdir, Path(env["catalogue"]))
    (workdir / "last_run.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def _client_fn(context: Context):  # noqa: ANN202
    from fedrec.training.flower_client import MerchantClient

    env = _settings()
    bundle = Path(env["bundles"][int(context.node_config["partition-id"])])
    state = Path(env["workdir"]) / "nodes" / bundle.name
    state.mkdir(parents=True, exist_ok=True)
    node = {"bundle": str(bundle), "state-dir": str(state), "artifacts-dir": str(state / "artifacts")}
    return MerchantClient(node).to_client()


client_app = ClientApp(client_fn=_client_fn)


def _tree_rss_mb(root: int) -> float:
    """Resident memory of a process and all its descendants (Ray's raylet, GCS and workers), MB."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            rss[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(rss.get(p, 0) for p in tree) / 2**20


def simulate(config: dict, bundles: list[Path], catalogue: Path, workdir: Path, cpus: int = 2) -> dict:
    """Run fedrec's ServerApp and ClientApp on `len(bundles)` virtual nodes of Flower's Ray engine.

    Returns the coordinator's summary (history with seconds per round, test recall@20) plus the
    wall time and the peak resident memory of this process and every process Ray started.
    """
    from flwr.simulation import run_simulation

    workdir.mkdir(parents=True, exist_ok=True)
    os.environ[ENV] = json.dumps(
        {"workdir": str(workdir), "catalogue": str(catalogue), "bundles": [str(b) for b in bundles], "config": config}
    )
    peak, done = [0.0], threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            peak[0] = max(peak[0], _tree_rss_mb(os.getpid()))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(bundles),
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False},
            },
        )
    finally:
        done.set()
        watcher.join()
    summary_path = workdir / "last_run.json"
    if not summary_path.is_file():
        raise RuntimeError(f"the Flower simulation ended without a summary ({summary_path}); see its log above")
    summary = json.loads(summary_path.read_text())
    summary["seconds_total"] = time.perf_counter() - t0
    summary["peak_rss_mb"] = peak[0]
    return summary
