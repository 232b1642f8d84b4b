"""`make experiments`: which federated strategy to use, under which skew, at how many merchants.

The grid: every strategy of `STRATEGIES` x every setting of `SETTINGS` (a partitioner, a number of
merchants, a skew and the share of merchants sampled per round) x 3 seeds, each a fixed number of
rounds with no early stopping, on the embedded shop log (or `--dataset movielens-100k`).

Fair tuning: each strategy has one hyperparameter (the server learning rate, or FedProx's mu) and
three candidates for it, the same budget for all, extended by one step at a time (at most two)
while the best lies at an edge. The value is chosen by the best validation recall@20 on the
natural partition with seed 0, before the grid runs, and then kept for every setting: no test
number is looked at to choose anything. Test recall@20 is that of the round with
the best validation recall (the model early stopping would release).

Bytes sent count both directions: each sampled merchant downloads the item tower and uploads its
message (dense float32), every round.

Results: results/experiments.json (one row per strategy x partition x merchants, plus every run's
curves), results/experiments.md, results/experiments-rounds.png and results/experiments-bytes.png.

    python -m fedrec.training.experiments [--dataset synthetic] [--small] [--workers 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedrec.atomic import write_json, write_text, write_with
from fedrec.config import RunConfig, load_config
from fedrec.evaluation import evaluate_test_all
from fedrec.features import build_item_features
from fedrec.federated.simulation import run_federated
from fedrec.federated.upload import dense_bytes
from fedrec.metrics import seed_std
from fedrec.model import item_embeddings, tower_state
from fedrec.threads import use_threads
from fedrec.training.cli import default_config_path
from fedrec.training.data import load_dataset

RESULTS = Path("results")


@dataclass(frozen=True)
class Strategy:
    """Fixed settings, plus the one setting tuned on validation and its candidates."""

    fixed: dict = field(default_factory=dict)
    tuned: str = "federation.server.lr"
    candidates: tuple[float, ...] = (0.5, 1.0, 2.0)


ADAPTIVE_LRS = (0.003, 0.01, 0.03)  # an adaptive step moves each weight by about lr
STRATEGIES: dict[str, Strategy] = {
    # McMahan et al. 2017: deltas weighted by purchases.
    "fedavg": Strategy({"federation.normalize_steps": False}),
    # Wang et al. 2020: per-step deltas, so big merchants' many steps do not dominate.
    "fednova": Strategy({"federation.normalize_steps": True}),
    # Li et al. 2020: FedAvg with a proximal pull towards the received tower.
    "fedprox": Strategy({"federation.normalize_steps": False}, "local.prox_mu", (0.001, 0.01, 0.1)),
    # Reddi et al. 2021, on FedNova-normalised deltas (the project's default aggregation).
    "fedadam": Strategy({"federation.server.name": "fedadam"}, candidates=ADAPTIVE_LRS),
    "fedyogi": Strategy({"federation.server.name": "fedyogi"}, candidates=ADAPTIVE_LRS),
    "fedadagrad": Strategy({"federation.server.name": "fedadagrad"}, candidates=ADAPTIVE_LRS),
}


@dataclass(frozen=True)
class Setting:
    partition: str = "natural"
    merchants: int = 0  # 0: the log's own merchants
    alpha: float = 0.0  # the partitioner's Dirichlet concentration (small = strong skew)
    fraction: float = 1.0  # merchants sampled per round


SETTINGS = (
    Setting(),
    Setting("dirichlet", 10, 0.1),
    Setting("quantity", 10, 0.5),
    Setting("dirichlet", 100, 0.1, 0.2),
    Setting("quantity", 100, 0.5, 0.2),
)


@dataclass(frozen=True)
class Grid:
    dataset: str = "synthetic"
    strategies: tuple[str, ...] = tuple(STRATEGIES)
    settings: tuple[Setting, ...] = SETTINGS
    seeds: tuple[int, ...] = (0, 1, 2)
    rounds: int = 30
    tune_rounds: int = 20
    max_extensions: int = 2  # extra candidates per strategy when the best lies at the edge


SMALL = Grid(
    strategies=("fedavg", "fedadam"),
    settings=(Setting(), Setting("dirichlet", 5, 0.1, 0.6)),
    seeds=(0, 1),
    rounds=2,
    tune_rounds=1,
    max_extensions=1,
)


def cell_config(grid: Grid, strategy: str, value: float, setting: Setting, seed: int, rounds: int) -> RunConfig:
    """The run configuration of one grid cell: the dataset's shipped config plus the cell's overrides."""
    spec = STRATEGIES[strategy]
    overrides = {
        **spec.fixed,
        spec.tuned: value,
        "data.dataset": grid.dataset,
        "data.partition": setting.partition,
        "federation.rounds": rounds,
        "federation.aggregation": "fedavg",  # the strategies are compared on the plain FedAvg message
        "federation.patience": 0,  # the whole curve; the best validation round is still what is scored
        "federation.refit": False,  # strategies are compared on the rounds they train, before any refit
        "federation.fraction": setting.fraction,
        "federation.seed": seed,
        "threads": 1,
    }
    if setting.partition != "natural":
        overrides |= {"data.partition_merchants": setting.merchants, "data.partition_alpha": setting.alpha}
    return load_config(default_config_path(grid.dataset), overrides)


def run_cell(grid: Grid, strategy: str, value: float, setting: Setting, seed: int, rounds: int) -> dict:
    """Train one cell and return its curves (validation recall@20 and bytes sent, by round) and test score."""
    cfg = cell_config(grid, strategy, value, setting, seed, rounds)
    use_threads(cfg.threads)
    dataset = load_dataset(cfg.data, seed)
    features = build_item_features(dataset.items, cfg.model.hash_buckets)
    t0 = time.perf_counter()
    res = run_federated(dataset, features, cfg.model, cfg.local, cfg.federation)
    seconds = time.perf_counter() - t0
    tower_bytes = dense_bytes(tower_state(res.item_state))  # what each sampled merchant downloads
    sent = np.cumsum([len(h.merchants) * (h.upload_bytes + tower_bytes) for h in res.history])
    test = evaluate_test_all(
        dataset.merchants, res.user_embeddings, item_embeddings(res.item_state, features, cfg.model), res.item_biases
    )
    return {
        "strategy": strategy,
        "setting": asdict(setting),
        "seed": seed,
        STRATEGIES[strategy].tuned: value,
        "merchants": len(dataset.merchants),  # the partitioner may leave a requested merchant empty
        "val_recall@20": [h.val_recall_at_20 for h in res.history],
        "bytes_sent": [int(b) for b in sent],
        "best_round": res.best_round,
        "recall@20": test["overall"]["recall@20"],
        "ndcg@20": test["overall"]["ndcg@20"],
        "seconds": round(seconds, 2),
    }


def _run(args: tuple) -> dict:
    return run_cell(*args)


def _map(jobs: list[tuple], workers: int) -> list[dict]:
    if workers <= 1:
        return [_run(j) for j in jobs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_run, jobs))


def _best_val(run: dict) -> float:
    return max(x for x in run["val_recall@20"] if x is not None)


def _next_value(values: list[float], upwards: bool) -> float:
    """One step beyond the searched range, at the ratio of the first two candidates."""
    ratio = values[1] / values[0]
    return round(values[-1] * ratio if upwards else values[0] / ratio, 6)


def tune(grid: Grid, workers: int) -> tuple[dict[str, float], list[dict]]:
    """Each strategy's value with the best validation recall@20 (natural partition, seed 0).

    Three candidates each; when the best is the first or the last, the search goes one step
    further that way, up to `grid.max_extensions` times, so no strategy is judged at the edge of
    a range that was too narrow for it. Every trial is kept in the results.
    """
    runs: list[dict] = []
    todo = {s: list(STRATEGIES[s].candidates) for s in grid.strategies}
    chosen: dict[str, float] = {}
    for step in range(grid.max_extensions + 1):
        jobs = [(grid, s, v, Setting(), 0, grid.tune_rounds) for s, values in todo.items() for v in values]
        runs += _map(jobs, workers)
        todo = {}
        for s in grid.strategies:
            key = STRATEGIES[s].tuned
            tried = sorted({r[key] for r in runs if r["strategy"] == s})
            best = max((r for r in runs if r["strategy"] == s), key=_best_val)[key]
            chosen[s] = best
            if best in (tried[0], tried[-1]) and step < grid.max_extensions:
                todo[s] = [_next_value(tried, best == tried[-1])]
        if not todo:
            break
    trials = [
        {"strategy": r["strategy"], "setting": STRATEGIES[r["strategy"]].tuned,
         "value": r[STRATEGIES[r["strategy"]].tuned], "best_val_recall@20": _best_val(r)}
        for r in runs
    ]  # fmt: skip
    return chosen, trials


def at_edge(chosen: dict[str, float], trials: list[dict]) -> list[str]:
    """Strategies whose chosen value is still the first or last value tried: a wider search might do better."""
    out = []
    for s, v in chosen.items():
        tried = sorted(t["value"] for t in trials if t["strategy"] == s)
        if v in (tried[0], tried[-1]):
            out.append(s)
    return out


def summarise(runs: list[dict], grid: Grid) -> list[dict]:
    """One row per strategy x setting: mean and spread over seeds of the final scores and curves."""
    rows = []
    for setting in grid.settings:
        for s in grid.strategies:
            mine = [r for r in runs if r["strategy"] == s and r["setting"] == asdict(setting)]
            recall = np.array([r["recall@20"] for r in mine])
            rows.append({
                "strategy": s,
                "partition": setting.partition,
                "alpha": setting.alpha,
                "merchants": setting.merchants or mine[0]["merchants"],
                "merchants_trained": sorted({r["merchants"] for r in mine}),
                "fraction": setting.fraction,
                "recall@20": float(recall.mean()),
                "recall@20_std": seed_std(recall),
                "ndcg@20": float(np.mean([r["ndcg@20"] for r in mine])),
                "rounds": grid.rounds,
                "best_round": float(np.mean([r["best_round"] for r in mine])),
                "bytes_sent": int(np.mean([r["bytes_sent"][-1] for r in mine])),
                "bytes_to_best_round": int(np.mean([r["bytes_sent"][r["best_round"] - 1] for r in mine])),
                "val_recall@20_curve": np.mean([r["val_recall@20"] for r in mine], axis=0).tolist(),
                "bytes_curve": np.mean([r["bytes_sent"] for r in mine], axis=0).tolist(),
                "seconds": float(np.mean([r["seconds"] for r in mine])),
            })  # fmt: skip
    return rows


def _setting(row: dict) -> tuple:
    return row["partition"], row["merchants"], row["alpha"], row["fraction"]


def _label(row: dict) -> str:
    if row["partition"] == "natural":
        return f"natural, {row['merchants']} merchants"
    return f"{row['partition']}(alpha={row['alpha']:g}), {row['merchants']} merchants, {row['fraction']:.0%} per round"


def markdown(res: dict) -> str:
    """A compact table (settings x strategies) and the full one (best round, bytes)."""
    strategies = list(dict.fromkeys(r["strategy"] for r in res["rows"]))
    settings = list(dict.fromkeys(_label(r) for r in res["rows"]))
    cell = {(_label(r), r["strategy"]): r for r in res["rows"]}
    lines = [
        f"# make experiments ({res['dataset']})",
        "",
        f"{res['rounds']} rounds, no early stopping; test recall@20 of the best validation round, mean +- std "
        f"over seeds {res['seeds']}. Tuned on validation (natural partition, seed 0): "
        + ", ".join(f"{s} {STRATEGIES[s].tuned.split('.')[-1]}={v:g}" for s, v in res["tuned"].items())
        + ".",
        "",
        "| setting | " + " | ".join(strategies) + " |",
        "|---|" + "---:|" * len(strategies),
    ]
    for label in settings:
        row = [f"{cell[label, s]['recall@20']:.4f} +- {cell[label, s]['recall@20_std']:.4f}" for s in strategies]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += [
        "",
        "| setting | strategy | recall@20 | best round | MB sent (to best round) | MB sent (all rounds) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in res["rows"]:
        lines.append(
            f"| {_label(row)} | {row['strategy']} | {row['recall@20']:.4f} +- {row['recall@20_std']:.4f} | "
            f"{row['best_round']:.1f} | {row['bytes_to_best_round'] / 1e6:.1f} | {row['bytes_sent'] / 1e6:.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path, x: str) -> None:
    """Mean validation recall@20 per strategy, one panel per setting, against rounds or MB sent."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(_setting(r) for r in res["rows"]))
    fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.4), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], settings, strict=True):
        for row in (r for r in res["rows"] if _setting(r) == key):
            ys = row["val_recall@20_curve"]
            xs = range(1, len(ys) + 1) if x == "rounds" else np.array(row["bytes_curve"]) / 1e6
            ax.plot(xs, ys, label=row["strategy"])
        part, merchants, alpha, fraction = key
        ax.set_title(f"{part}" + (f" a={alpha:g}" if part != "natural" else "") + f", {merchants} m, {fraction:.0%}",
                     fontsize=9)  # fmt: skip
        ax.set_xlabel("round" if x == "rounds" else "MB sent (up + down)")
    axes[0][0].set_ylabel("validation recall@20")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def run_grid(grid: Grid, workers: int, results_dir: Path, command: str) -> dict:
    t0 = time.perf_counter()
    tuned, trials = tune(grid, workers)
    print(f"tuned on validation: {tuned}", flush=True)
    jobs = [
        (grid, s, tuned[s], setting, seed, grid.rounds)
        for setting in grid.settings
        for s in grid.strategies
        for seed in grid.seeds
    ]
    runs = _map(jobs, workers)
    res = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores, {workers} worker(s), 1 thread each",
        "dataset": grid.dataset,
        "rounds": grid.rounds,
        "seeds": list(grid.seeds),
        "tuned": tuned,
        "tuning": trials,
        "tuned_at_edge": at_edge(tuned, trials),
        "rows": summarise(runs, grid),
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json(results_dir / "experiments.json", res)
    write_text(results_dir / "experiments.md", markdown(res))
    plot(res, results_dir / "experiments-rounds.png", "rounds")
    plot(res, results_dir / "experiments-bytes.png", "bytes")
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--small", action="store_true", help="a tiny grid (CI)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    grid = dataclasses.replace(SMALL if args.small else Grid(), dataset=args.dataset)
    res = run_grid(grid, args.workers, args.results, f"make experiments DATASET={args.dataset}")
    print(markdown(res))


if __name__ == "__main__":
    main()
