"""`fedrec privacy-report`: recall@20 of the federated model against the privacy budget.

For each dataset and epsilon (delta fixed), trains with customer-level DP over the given seeds
and records the test recall@20 (mean, std), the noise multiplier the accountant chose, the clip,
the sampling rate and the epsilon actually spent. epsilon = inf is the non-private federated
model with the dataset's own config (its early stopping included), the reference for the ratio.
Writes results/privacy-report.json (appending rows for other datasets), a markdown table and a
PNG curve per dataset.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from fedrec.atomic import write_json, write_text, write_with
from fedrec.config import RunConfig, with_overrides
from fedrec.metrics import seed_std
from fedrec.training.train import train

EPSILONS = (1.0, 2.0, 4.0, 8.0, 16.0, math.inf)


def _row(cfg: RunConfig, epsilon: float, seeds: list[int], console: Console) -> dict:
    recalls, spent, seconds, mech = [], [], [], None
    for seed in seeds:
        run_cfg = with_overrides(cfg, {"federation.seed": seed, "privacy.epsilon": epsilon})
        t0 = time.perf_counter()
        run = train(run_cfg, Console(quiet=True))
        seconds.append(time.perf_counter() - t0)
        recalls.append(run.test["overall"]["recall@20"])
        mech = run.result.privacy
        spent.append(mech["epsilon"] if mech else "inf")
        console.print(
            f"  {cfg.data.dataset} epsilon={epsilon} seed={seed}: recall@20 {recalls[-1]:.4f} ({seconds[-1]:.0f}s)"
        )
    return {
        "dataset": cfg.data.dataset,
        "epsilon": epsilon if math.isfinite(epsilon) else "inf",
        "delta": cfg.privacy.delta,
        "recall@20": float(np.mean(recalls)),
        "seeds": seeds,
        "per_seed": recalls,
        "epsilon_spent": spent,
        "noise_multiplier": mech["noise_multiplier"] if mech else 0.0,
        "clip": cfg.privacy.clip if mech else None,
        "sample_rate": mech["sample_rate"] if mech else None,
        "rounds": mech["rounds"] if mech else None,
        "noise_split": cfg.privacy.noise_split if mech else 0,
        "mechanism": cfg.privacy.mechanism if mech else None,
        "accountant": cfg.privacy.accountant if mech else None,  # Opacus's prv or rdp (rdp before 2026-12-06)
        "max_purchases": cfg.privacy.max_purchases if mech and cfg.privacy.mechanism == "als" else None,
        # DP-ALS's merchant item bias from noised counts (0: none)
        "count_share": mech.get("count_share", 0.0) if mech else None,
        "count_weight": mech.get("count_weight") if mech else None,
        # what the released model trained on: under DP with the refit on, one run on train + validation
        "trained_on": "train+validation" if cfg.federation.refit else "train",
        "epsilon_if_other_merchants_collude": mech.get("epsilon_if_other_merchants_collude") if mech else None,
        "seconds": float(np.mean(seconds)),
    }


def privacy_report(
    cfg: RunConfig,
    epsilons: list[float],
    seeds: list[int],
    dp_rounds: int,
    console: Console,
    dp_sets: dict[str, object] | None = None,
) -> list[dict]:
    """One row per epsilon; DP rows train `dp_rounds` rounds (the last one is released), with the
    `dp_sets` overrides (e.g. the split-noise settings), which the non-private row never gets."""
    rows = []
    dp_overrides = {"federation.rounds": dp_rounds, **(dp_sets or {})}
    for eps in epsilons:
        # the budget comes with the overrides: some settings are only valid under DP (a DP-ALS count bias)
        run_cfg = with_overrides(cfg, {**dp_overrides, "privacy.epsilon": eps}) if math.isfinite(eps) else cfg
        rows.append(_row(run_cfg, eps, seeds, console))
    return rows


def _mechanism(r: dict) -> str:
    """A row's DP mechanism; rows written before there was a choice are DP-SGD's."""
    return "none" if r["epsilon"] == "inf" else r.get("mechanism") or "dp_sgd"


def _key(r: dict) -> tuple[str, str, int, str]:
    return r["dataset"], str(r["epsilon"]), r.get("noise_split", 0), _mechanism(r)


def _noise(r: dict) -> str:
    if r["epsilon"] == "inf":
        return "none"
    where = f"split over {r['noise_split']}" if r.get("noise_split") else "per merchant"
    return f"{where}, {_mechanism(r)}"


def write_report(rows: list[dict], results_dir: Path, command: str) -> dict[str, Path]:
    """Merge rows into results/privacy-report.json by (dataset, epsilon, noise split, mechanism); table and
    curves beside it. Every row's std is derived here from its per-seed recalls (`seed_std`, as in
    every other report), so rows kept from older runs, which wrote the population std, are
    stated the same way as new ones."""
    path = results_dir / "privacy-report.json"
    old = json.loads(path.read_text())["runs"] if path.is_file() else []
    rows = [{**r, "command": command} for r in rows]  # each row says which run made it
    fresh = {_key(r) for r in rows}
    runs = [r for r in old if _key(r) not in fresh] + rows
    runs = [{**r, "recall@20_std": seed_std(r["per_seed"])} if "per_seed" in r else r for r in runs]
    res = {"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "command": command, "runs": runs}
    write_json(path, res)
    lines = [
        "| dataset | noise | epsilon | delta | recall@20 (mean ± std) | vs non-private | seeds | noise multiplier "
        "| clip | sample rate | rounds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ds in sorted({r["dataset"] for r in runs}):
        part = [r for r in runs if r["dataset"] == ds]
        ref = next((r["recall@20"] for r in part if r["epsilon"] == "inf"), None)
        order = sorted(
            part,
            key=lambda r: (_mechanism(r), r.get("noise_split", 0), math.inf if r["epsilon"] == "inf" else r["epsilon"]),
        )
        for r in order:
            ratio = f"{r['recall@20'] / ref:.3f}" if ref else "-"  # 3 places: 0.846 is not 0.85
            lines.append(
                f"| {ds} | {_noise(r)} | {r['epsilon']} | {r['delta']:g} "
                f"| {r['recall@20']:.4f} ± {r['recall@20_std']:.4f} | {ratio} "
                f"| {len(r['seeds'])} | {r['noise_multiplier']:.3f} | {r['clip'] or '-'} | {r['sample_rate'] or '-'} "
                f"| {r['rounds'] or 'early stop'} |"
            )
    md = results_dir / "privacy-report.md"
    write_text(md, "\n".join(lines) + "\n")
    png = results_dir / "privacy-report.png"
    write_with(png, lambda tmp: _plot(runs, tmp))
    return {"json": path, "md": md, "png": png}


def _plot(runs: list[dict], target: Path) -> None:
    """One panel per dataset: a curve per (mechanism, noise mode), the non-private model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in runs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, ds in zip(axes[0], datasets, strict=True):
        part = [r for r in runs if r["dataset"] == ds]
        modes = sorted({(_mechanism(r), r.get("noise_split", 0)) for r in part if r["epsilon"] != "inf"})
        for mechanism, split in modes:
            dp = sorted((r for r in part if r["epsilon"] != "inf" and (_mechanism(r), r.get("noise_split", 0))
                         == (mechanism, split)), key=lambda r: r["epsilon"])  # fmt: skip
            ax.errorbar(
                [r["epsilon"] for r in dp], [r["recall@20"] for r in dp], yerr=[r["recall@20_std"] for r in dp],
                marker="o" if split else "s", ls="-" if mechanism == "dp_sgd" else "--", capsize=3,
                label=_noise(dp[0]),
            )  # fmt: skip
        ref = next((r for r in part if r["epsilon"] == "inf"), None)
        if ref:
            ax.axhline(ref["recall@20"], ls=":", color="black", label="no DP")
        ax.set_title(ds)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("epsilon (delta = 1e-5)")
        ax.set_ylabel("test recall@20")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(target, format="png")
    plt.close(fig)
