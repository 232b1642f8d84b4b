"""`fedrec attack-report`: the purchased-items leakage attack under each protection.

One round from the initial model: every merchant runs `local_update` without and with
customer-level DP (the mechanism planned for `epsilon` over `dp_rounds` rounds). The
honest-but-curious coordinator ranks item rows by norm (`fedrec.privacy.attacks`) in:
- `none`: the target merchant's own update (what it sees without secure aggregation);
- `secagg_sum`: the sum over all merchants' terms (all SecAgg+ lets it decode);
- `dp`: the target merchant's DP update;
- `dp_secagg`: the sum of the DP updates.
Each merchant is the target once; the report gives the mean and the per-merchant figures.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from fedrec.atomic import write_json
from fedrec.config import RunConfig
from fedrec.errors import FedrecError
from fedrec.features import build_item_features
from fedrec.federated.aggregation import DELTA, merchant_sums
from fedrec.federated.local import local_update
from fedrec.model import init_item_bias, init_user_embeddings, new_item_tower
from fedrec.privacy.accountant import plan_mechanism
from fedrec.privacy.attacks import leakage_metrics, row_scores
from fedrec.training.data import load_dataset

TABLE = "item_emb.weight"


def leakage_report(cfg: RunConfig, epsilon: float, dp_rounds: int, console: Console) -> dict:
    torch.set_num_threads(cfg.threads)
    seed = cfg.federation.seed
    dataset = load_dataset(cfg.data, seed)
    if not cfg.model.use_item_id:
        raise FedrecError("the leakage attack reads the item-id table: model.use_item_id must be on")
    features = build_item_features(dataset.items, cfg.model.hash_buckets)
    state = {k: v.detach().clone() for k, v in new_item_tower(dataset.n_items, cfg.model, seed).state_dict().items()}
    mech = plan_mechanism(dataclasses.replace(cfg.privacy, epsilon=epsilon), dp_rounds, cfg.local.epochs)
    fed = cfg.federation
    own: dict[str, dict[str, np.ndarray]] = {"none": {}, "dp": {}}
    sums = {"none": None, "dp": None}
    for i, m in enumerate(dataset.merchants):
        users = init_user_embeddings(m.n_users, cfg.model, torch.Generator().manual_seed(seed * 7919 + i))
        bias = init_item_bias(dataset.n_items, cfg.model)
        for setting, dp in (("none", None), ("dp", mech)):
            res = local_update(state, users, m.train, features, cfg.model, cfg.local, seed * 1009 + i, bias, dp)
            terms = merchant_sums(
                res.delta, res.num_examples, res.num_steps, res.touched_rows, res.mean_loss,
                fed.aggregation, fed.normalize_steps,
            )  # fmt: skip
            table = terms[DELTA + TABLE].numpy()
            own[setting][m.name] = table
            sums[setting] = table.copy() if sums[setting] is None else sums[setting] + table
        console.print(f"  {m.name}: updates without and with DP computed")
    per: dict[str, dict[str, dict]] = {k: {} for k in ("none", "secagg_sum", "dp", "dp_secagg")}
    for m in dataset.merchants:
        sold = np.asarray(m.train.sum(axis=0)).ravel() > 0
        per["none"][m.name] = leakage_metrics(row_scores(own["none"][m.name]), sold)
        per["secagg_sum"][m.name] = leakage_metrics(row_scores(sums["none"]), sold)
        per["dp"][m.name] = leakage_metrics(row_scores(own["dp"][m.name]), sold)
        per["dp_secagg"][m.name] = leakage_metrics(row_scores(sums["dp"]), sold)
    out = {}
    for setting, rows in per.items():
        out[setting] = {
            key: float(np.mean([r[key] for r in rows.values()])) for key in ("precision", "recall", "auc")
        } | {"per_merchant": rows}
    out["dp"]["epsilon"] = out["dp_secagg"]["epsilon"] = epsilon
    out["dp"]["noise_multiplier"] = out["dp_secagg"]["noise_multiplier"] = mech.noise_multiplier
    return {"dataset": dataset.name, "merchants": len(dataset.merchants), "items": dataset.n_items, "leakage": out}


def write_attack_report(res: dict, results_dir: Path, command: str) -> Path:
    """results/attack-report.json: the last run (membership and poisoning are not measured yet)."""
    path = results_dir / "attack-report.json"
    write_json(path, {"created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "command": command, **res})
    return path
