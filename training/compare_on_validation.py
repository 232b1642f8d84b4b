"""`fedrec compare-on-validation`: choose one setting's value by validation recall@20 alone.

How a default gets chosen without looking at test: each candidate value of one setting is trained
over several seeds with the refit off (the refit consumes the validation slice), and scored by
the validation recall@20 of the model it releases: its best round (the number early stopping
chooses the round by), or under DP its last round. The candidate
with the highest mean wins; the report says whether its lead exceeds the spread (one standard
deviation of either candidate). Test is never evaluated here.

    fedrec compare-on-validation --dataset movielens-100k --setting federation.aggregation \
        --candidates fedavg,rowwise --seeds 3

Results: results/validation-<setting>[-<tag>]-<dataset>.json.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import math
import sys
from pathlib import Path

import numpy as np
from rich.console import Console

from fedrec.atomic import write_json
from fedrec.config import RunConfig, load_config
from fedrec.errors import ConfigError
from fedrec.evaluation import combine_sums, evaluate_val
from fedrec.features import build_item_features
from fedrec.federated import simulation
from fedrec.federated.content_choice import fixed_weight
from fedrec.federated.simulation import run_federated
from fedrec.metrics import seed_std
from fedrec.model import item_embeddings
from fedrec.privacy.accountant import plan_mechanism
from fedrec.threads import use_threads
from fedrec.training.data import load_dataset
from fedrec.training.train import trained_with

NO_VALIDATION = f"no validation customers, so nothing to compare on: {simulation.NO_VALIDATION}"


def parse_candidates(text: str) -> list:
    """Comma-separated values, each read as JSON where it parses (numbers, true/false), else a string."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            values.append(json.loads(part))
        except json.JSONDecodeError:
            values.append(part)
    if len(values) < 2:
        raise ConfigError(f"--candidates {text!r}: give at least two comma-separated values")
    return values


def best_val_recall(cfg: RunConfig) -> tuple[float, int]:
    """Validation recall@20 of the model a run (refit off) releases, and that round.

    Non-private, that is the best round (early stopping's choice); under DP (`privacy.epsilon`
    set) it is the last round, the one DP training releases. With a fixed content-match weight
    (the DP form) the released model is scored on validation with it.
    """
    use_threads(cfg.threads)
    dataset = load_dataset(cfg.data, cfg.federation.seed)
    features = build_item_features(dataset.items, cfg.model.hash_buckets)
    dp = plan_mechanism(cfg.privacy, cfg.federation.rounds, cfg.local.epochs)
    fed = dataclasses.replace(cfg.federation, refit=False)  # the refit (and DP's) would train on validation
    res = run_federated(dataset, features, cfg.model, cfg.local, fed, dp=dp)
    model = trained_with(cfg, res).model
    if res.content_match is not None and res.content_match.weight > 0 and fixed_weight(model) is not None:
        # a fixed match is added after training, so the rounds' scores lack it: score the model with it
        # (a chosen one was chosen on this slice, so its runs are compared by their rounds' scores)
        items = item_embeddings(res.item_state, features, model)
        parts = [
            evaluate_val(m, res.user_embeddings[m.name], items, res.item_biases[m.name]) for m in dataset.merchants
        ]
        total = combine_sums(parts)
        if not total.users:
            raise ConfigError(NO_VALIDATION)
        return total.means()["recall@20"], res.best_round
    # A round without validation customers scores NaN (0 hits over 0 customers): not a score
    scored = {
        h.round: h.val_recall_at_20
        for h in res.history
        if h.val_recall_at_20 is not None and not math.isnan(h.val_recall_at_20)
    }
    if not scored:
        raise ConfigError(NO_VALIDATION)
    if res.best_round in scored:
        return scored[res.best_round], res.best_round
    return max((v, r) for r, v in scored.items())


def summarise(scores: dict[str, list[float]]) -> dict:
    """Means, spreads and the winner; `clear` only when the winner's lead exceeds both spreads."""
    stats = {k: {"mean": float(np.mean(v)), "std": seed_std(v)} for k, v in scores.items()}
    ranked = sorted(stats, key=lambda k: stats[k]["mean"], reverse=True)
    best, runner = ranked[0], ranked[1]
    lead = stats[best]["mean"] - stats[runner]["mean"]
    clear = lead > max(stats[best]["std"], stats[runner]["std"])
    return {"stats": stats, "best": best, "runner_up": runner, "lead": lead, "clear": clear}


def compare_on_validation(
    config: Path | None, overrides: dict, setting: str, candidates: list, seeds: int, console: Console, tag: str = ""
) -> dict:
    if tag and not tag.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"--tag {tag!r}: use letters, digits, - and _ only (it goes into a file name)")
    base = load_config(config, overrides)  # a bad base config, or tag, fails before any training
    scores: dict[str, list[float]] = {}
    rounds: dict[str, list[int]] = {}
    dataset = ""
    for value in candidates:
        for seed in range(seeds):
            cfg = load_config(
                config,
                {**overrides, setting: value, "federation.seed": seed, "federation.refit": False},
            )
            dataset = cfg.data.dataset
            val, rnd = best_val_recall(cfg)
            scores.setdefault(str(value), []).append(round(val, 4))
            rounds.setdefault(str(value), []).append(rnd)
            console.print(f"{setting}={value} seed {seed}: best validation recall@20 {val:.4f} (round {rnd})")
    result = {
        "what": f"best validation recall@20 per candidate of {setting} (refit off; test never evaluated)",
        "dataset": dataset,
        "setting": setting,
        "seeds": list(range(seeds)),
        "overrides": overrides,
        "val_recall@20": scores,
        "best_round": rounds,
        **summarise(scores),
        "date": dt.date.today().isoformat(),
        "command": "fedrec " + " ".join(sys.argv[1:]),
    }
    out = Path(base.output.results_dir) / f"validation-{setting}{'-' + tag if tag else ''}-{dataset}.json"
    write_json(out, result)
    s = result["stats"]
    console.print(
        f"best: {result['best']} {s[result['best']]['mean']:.4f} ± {s[result['best']]['std']:.4f}, "
        f"runner-up {result['runner_up']} {s[result['runner_up']]['mean']:.4f} ± "
        f"{s[result['runner_up']]['std']:.4f}: lead {'exceeds' if result['clear'] else 'within'} the spread\n"
        f"written: {out}"
    )
    return result
