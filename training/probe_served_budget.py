"""How the served-weight budget (`model.max_top1_share`) was chosen: on validation only.

Issue 9's concentration target is "ours no more concentrated than ALS": the top-1 share of the
pooled lists. For each candidate budget, every merchant chooses its served weight as training does
(`fedrec/served_weight.py`, with the early-stopped model), and this records the pooled validation
recall@20 and top-1 share that result, beside the top-1 share of implicit's ALS (its settings
chosen on validation, as `make evaluate` chooses them) on the same validation customers. The
shipped budget is the largest whose pooled validation top-1 share stays below ALS's on every seed.
Test is never read.

`make probe-served-budget DATASET=synthetic` (`python -m fedrec.training.probe_served_budget
--dataset synthetic`) writes `results/probe-served-budget-<dataset>.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
from pathlib import Path

import numpy as np
import torch

from fedrec import served_weight
from fedrec.atomic import write_json
from fedrec.baselines import implicit_als
from fedrec.config import load_config
from fedrec.data import pooled
from fedrec.errors import FedrecError
from fedrec.evaluation import weighted_lists
from fedrec.features import build_item_features
from fedrec.federated.simulation import run_federated
from fedrec.metrics import eligible_users, top1_share, topk_items
from fedrec.model import item_embeddings
from fedrec.threads import use_threads
from fedrec.training.data import load_dataset
from fedrec.training.evaluate import choose_als_settings
from fedrec.training.train import trained_with

BUDGETS = (1.0, 0.5, 0.3, 0.2, 0.15, 0.1, 0.05)


def probe(dataset_name: str, seeds: tuple[int, ...]) -> dict:
    from fedrec.training.cli import default_config_path

    cfg = load_config(default_config_path(dataset_name), {"threads": 1})
    use_threads(1)
    dataset = load_dataset(cfg.data, cfg.federation.seed)
    features = build_item_features(dataset.items, cfg.model.hash_buckets)
    pool = pooled(dataset)
    settings, _ = choose_als_settings(dataset, seeds)
    eligible = np.flatnonzero(eligible_users(pool.train, pool.val))
    per_seed = {}
    for seed in seeds:
        run_cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, seed=seed))
        res = run_federated(dataset, features, run_cfg.model, run_cfg.local, run_cfg.federation)
        model = trained_with(run_cfg, res).model
        first = res.early_stopped or res  # trained on train alone: validation is unseen
        items = item_embeddings(first.item_state, features, model)
        rows = {}
        for budget in BUDGETS:
            chosen = served_weight.choose_all(
                dataset.merchants, first.user_embeddings, items, first.item_biases,
                model.served_popularity_weights, budget,
            )  # fmt: skip
            hits, users, lists = 0.0, 0, []
            for m in dataset.merchants:
                w = chosen[m.name].weight if m.name in chosen else 1.0
                sums, top = weighted_lists(m, first.user_embeddings[m.name], items, first.item_biases[m.name], w, "val")
                hits, users = hits + sums.sums["recall@20"], users + sums.users
                lists.append(top)
            rows[f"{budget:g}"] = {
                "val_recall@20": hits / users,
                "val_top1_share": top1_share(np.vstack(lists)),
                "weights": {n: c.weight for n, c in chosen.items()},
            }
        u, v = implicit_als(pool.train, **settings, seed=seed)
        als_top = topk_items(u[torch.from_numpy(eligible)], v, pool.train[eligible], 1)
        per_seed[str(seed)] = {"budgets": rows, "implicit_als_val_top1_share": top1_share(als_top)}
    below = [
        b
        for b in BUDGETS
        if all(s["budgets"][f"{b:g}"]["val_top1_share"] < s["implicit_als_val_top1_share"] for s in per_seed.values())
    ]
    return {
        "what": "served-weight budget (model.max_top1_share) against pooled validation recall@20 and top-1 share",
        "command": f"make probe-served-budget DATASET={dataset_name}",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dataset": dataset.name,
        "seeds": list(seeds),
        "implicit_als_settings": settings,
        "largest_budget_below_als_on_every_seed": max(below) if below else None,
        "per_seed": per_seed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        out = probe(args.dataset, tuple(range(args.seeds)))
    except FedrecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    path = Path("results") / f"probe-served-budget-{out['dataset']}.json"
    write_json(path, out)
    print(f"largest budget below ALS's validation top-1 share: {out['largest_budget_below_als_on_every_seed']}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
