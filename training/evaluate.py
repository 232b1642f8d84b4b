"""`fedrec evaluate`: federated vs centralized vs local-only vs popularity vs implicit ALS.

All neural variants share one code path: centralized is the federated loop with one client
holding the pooled data; local-only is the loop run by each merchant on its own data.
Writes results/evaluation-<dataset>.json, a markdown table and a recall@20-per-round plot.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from fedrec.atomic import write_json, write_text, write_with
from fedrec.baselines import implicit_als, popularity
from fedrec.config import RunConfig
from fedrec.data import FederatedDataset, pooled
from fedrec.evaluation import MetricSums, combine, evaluate_test, evaluate_test_all
from fedrec.features import build_item_features
from fedrec.federated.simulation import TrainResult, run_federated
from fedrec.metrics import METRICS
from fedrec.model import item_embeddings
from fedrec.training.data import load_dataset
from fedrec.training.progress import RoundPrinter

METHODS = ("federated", "centralized", "local_only", "popularity", "implicit_als")


def _split_rows(dataset: FederatedDataset, vecs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pooled user rows back to merchants (pooled() stacks merchants in order)."""
    bounds = np.cumsum([0] + [m.n_users for m in dataset.merchants])
    return {m.name: vecs[bounds[i] : bounds[i + 1]] for i, m in enumerate(dataset.merchants)}


def _neural(dataset, features, cfg, fed_cfg, console, label) -> TrainResult:
    printer = RoundPrinter(console, label, len(dataset.merchants))
    return run_federated(dataset, features, cfg.model, cfg.local, fed_cfg, on_round=printer)


def evaluate(cfg: RunConfig, console: Console | None = None, quiet_rounds: bool = False) -> dict:
    console = console or Console()
    torch.set_num_threads(cfg.threads)
    dataset = load_dataset(cfg.data, cfg.federation.seed)
    features = build_item_features(dataset.items, cfg.model.hash_buckets)
    out: dict = {
        "dataset": dataset.name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": f"make evaluate DATASET={dataset.name}",
        "data": dataset.summary(),
        "protocol": dataset.protocol,
        "metrics": list(METRICS),
    }
    curves: dict[str, list[float]] = {}
    quiet = Console(quiet=True)
    show = quiet if quiet_rounds else console

    def record(name: str, users, items, seconds: float, result: TrainResult | None = None, biases=None) -> None:
        entry = evaluate_test_all(dataset.merchants, users, items, biases)
        entry["seconds"] = round(seconds, 2)
        if result is not None:
            entry["rounds"] = len(result.history)
            entry["best_round"] = result.best_round
            curves[name] = [h.val_recall_at_20 for h in result.history]
        out[name] = entry
        console.print(f"[bold]{name}[/]: recall@20 {entry['overall']['recall@20']:.4f}  ({seconds:.1f}s)")

    # Federated, with the configured aggregation rule.
    res = _neural(dataset, features, cfg, cfg.federation, show, "federated")
    items = item_embeddings(res.item_state, features, cfg.model)
    record("federated", res.user_embeddings, items, res.seconds, res, res.item_biases)

    # Centralized: one client holding the pooled data; same model, loss and schedule.
    central = FederatedDataset(dataset.name, dataset.items, [pooled(dataset)], dataset.protocol)
    res = _neural(central, features, cfg, cfg.federation, show, "centralized")
    record(
        "centralized",
        _split_rows(dataset, res.user_embeddings["pooled"]),
        item_embeddings(res.item_state, features, cfg.model),
        res.seconds,
        res,
        {m.name: res.item_biases["pooled"] for m in dataset.merchants},  # one bias: the pooled shop's
    )

    # Local-only: every merchant trains the same model on its own customers alone.
    parts: dict[str, MetricSums] = {}
    t0, rounds = time.perf_counter(), 0
    for m in dataset.merchants:
        alone = FederatedDataset(dataset.name, dataset.items, [m], dataset.protocol)
        res = run_federated(alone, features, cfg.model, cfg.local, cfg.federation)
        rounds = max(rounds, len(res.history))
        parts[m.name] = evaluate_test(
            m,
            res.user_embeddings[m.name],
            item_embeddings(res.item_state, features, cfg.model),
            res.item_biases[m.name],
        )
    entry = combine(parts)
    entry.update(seconds=round(time.perf_counter() - t0, 2), rounds=rounds)
    out["local_only"] = entry
    console.print(f"[bold]local_only[/]: recall@20 {entry['overall']['recall@20']:.4f}")

    # Baselines on everything before the test cut-off (they need no validation slice).
    full = pooled(dataset).full_train
    t0 = time.perf_counter()
    u, v = popularity(full)
    record("popularity", _split_rows(dataset, u), v, time.perf_counter() - t0)
    t0 = time.perf_counter()
    u, v = implicit_als(full, seed=cfg.federation.seed)
    record("implicit_als", _split_rows(dataset, u), v, time.perf_counter() - t0)
    out["implicit_als"]["settings"] = {"factors": 32, "regularization": 0.1, "alpha": 5.0, "iterations": 15}

    # Ablations: each design choice of the federated run flipped alone.
    other = "fedavg" if cfg.federation.aggregation == "rowwise" else "rowwise"
    variants = {
        f"aggregation={other}": (cfg.model, dataclasses.replace(cfg.federation, aggregation=other)),
        f"normalize_steps={not cfg.federation.normalize_steps}": (
            cfg.model,
            dataclasses.replace(cfg.federation, normalize_steps=not cfg.federation.normalize_steps),
        ),
        f"merchant_item_bias={not cfg.model.merchant_item_bias}": (
            dataclasses.replace(cfg.model, merchant_item_bias=not cfg.model.merchant_item_bias),
            cfg.federation,
        ),
    }
    out["ablations"] = {}
    for label, (model_cfg, fed_cfg) in variants.items():
        variant = dataclasses.replace(cfg, model=model_cfg, federation=fed_cfg)
        res = _neural(dataset, features, variant, fed_cfg, show, f"federated ({label})")
        abl = evaluate_test_all(
            dataset.merchants,
            res.user_embeddings,
            item_embeddings(res.item_state, features, model_cfg),
            res.item_biases,
        )
        out["ablations"][label] = {
            "overall": abl["overall"],
            "per_merchant": abl["per_merchant"],
            "rounds": len(res.history),
            "best_round": res.best_round,
        }
        curves[f"federated ({label})"] = [h.val_recall_at_20 for h in res.history]
        console.print(f"[bold]federated ({label})[/]: recall@20 {abl['overall']['recall@20']:.4f}")

    fed, cen = out["federated"]["overall"]["recall@20"], out["centralized"]["overall"]["recall@20"]
    local_pm = out["local_only"]["per_merchant"]
    fed_pm = out["federated"]["per_merchant"]
    out["checks"] = {
        "federated_over_centralized_recall@20": round(fed / cen, 4) if cen else None,
        "federated_beats_local_only_for": sorted(
            n for n in fed_pm if fed_pm[n]["recall@20"] > local_pm[n]["recall@20"]
        ),
        "federated_beats_local_only_overall": fed > out["local_only"]["overall"]["recall@20"],
    }
    out["config"] = cfg.to_dict()
    out["curves"] = curves
    return out


def markdown_table(res: dict) -> str:
    head = "| method | " + " | ".join(METRICS) + " | seconds |\n|---|" + "---:|" * (len(METRICS) + 1) + "\n"
    rows = [
        f"| {m} | " + " | ".join(f"{res[m]['overall'][k]:.4f}" for k in METRICS) + f" | {res[m]['seconds']} |"
        for m in METHODS
    ]
    merchants = list(res["federated"]["per_merchant"])
    pm = (
        "\n\nrecall@20 per merchant (users):\n\n| method | "
        + " | ".join(f"{n} ({res['federated']['per_merchant'][n]['users']})" for n in merchants)
        + " |\n|---|"
        + "---:|" * len(merchants)
        + "\n"
    )
    pm += "\n".join(
        f"| {m} | " + " | ".join(f"{res[m]['per_merchant'][n]['recall@20']:.4f}" for n in merchants) + " |"
        for m in METHODS
    )
    checks = res["checks"]
    foot = (
        f"\n\nfederated / centralized recall@20: {checks['federated_over_centralized_recall@20']}; "
        f"federated beats local-only for {len(checks['federated_beats_local_only_for'])}/{len(merchants)} merchants.\n"
    )
    abl = "".join(f"Ablation {k}: recall@20 {v['overall']['recall@20']:.4f}.\n" for k, v in res["ablations"].items())
    return f"# Evaluation: {res['dataset']}\n\n" + head + "\n".join(rows) + pm + foot + abl


def plot_curves(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in res["curves"].items():
        ax.plot(range(1, len(ys) + 1), ys, label=name)
    for name in ("popularity", "implicit_als"):
        ax.axhline(
            res[name]["overall"]["recall@20"],
            ls="--",
            lw=1,
            label=f"{name} (test)",
            color="grey" if name == "popularity" else "black",
        )
    ax.set_xlabel("round (centralized: epochs of the pooled data)")
    ax.set_ylabel("recall@20")
    ax.set_title(f"{res['dataset']}: validation recall@20 per round")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_results(res: dict, results_dir: Path) -> dict[str, Path]:
    name = res["dataset"]
    paths = {
        "json": results_dir / f"evaluation-{name}.json",
        "markdown": results_dir / f"evaluation-{name}.md",
        "plot": results_dir / f"recall-vs-rounds-{name}.png",
    }
    write_json(paths["json"], res)
    write_text(paths["markdown"], markdown_table(res))
    plot_curves(res, paths["plot"])
    return paths
