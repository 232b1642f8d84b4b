"""`fedrec evaluate-foldin`: how well a basket fold-in stands in for a learned user vector.

The anonymous-customer endpoint has no user embedding: it folds one in from the items given.
Here every test customer is treated as anonymous: their purchases before the test cut-off are
the basket, each fold-in rule (and regularisation) solves a user vector against the trained
item vectors (with the merchant's item bias where the model has one), and full-ranking
recall@20/NDCG@20 on the test purchases is compared with the learned user vectors.
Writes results/foldin-<dataset>.json, from which `fedrec serve`'s fold-in default was chosen
(serving/settings.py).
"""

from __future__ import annotations

import datetime as dt
import functools
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console

from fedrec.atomic import write_json
from fedrec.config import RunConfig
from fedrec.content_profiles import fold_in_with_match
from fedrec.data import MerchantData
from fedrec.evaluation import MetricSums, combine, evaluate_test
from fedrec.federated import copurchase_choice
from fedrec.federated.content_choice import block
from fedrec.ials_users import solve_ials_baskets
from fedrec.metrics import eligible_users
from fedrec.serving.foldin import EXACT_TOL, fold_in_many
from fedrec.training.train import train

# (method, reg, solve): "exact" solves to a 1e-9 relative decrease with the full Hessian; "serving"
# is what `fedrec serve` runs (FAST_TOL, FAST_HESSIAN_ITEMS), measured beside the exact solve.
RULES: tuple[tuple[str, float, str], ...] = (
    ("mean", 0.0, "exact"),
    ("ridge", 1.0, "exact"),
    ("ridge", 3.0, "exact"),
    ("ridge", 10.0, "exact"),
    ("softmax", 0.3, "exact"),
    ("softmax", 1.0, "exact"),
    ("softmax", 1.0, "serving"),
    ("softmax", 3.0, "exact"),
    ("softmax", 10.0, "exact"),
)
SOLVES = {"exact": {"tol": EXACT_TOL, "hessian_items": None}, "serving": {}}
METRICS = ("recall@20", "ndcg@20")
BATCH = 16  # baskets per solve, as a busy server's micro-batches


def rules_for(loss: str) -> list[tuple[str, float, str]]:
    """`RULES`, where an ials model's "softmax" rows are ALS's exact user step at the same regs: the
    fold-in the API runs for a model trained with that loss (`serving.recommend.basket_vectors`)."""
    if loss != "ials":
        return list(RULES)
    return [("ials", reg, "exact") if m == "softmax" else (m, reg, solve) for m, reg, solve in RULES
            if not (m == "softmax" and solve == "serving")]  # fmt: skip


def evaluate_foldin(cfg: RunConfig, console: Console, users_per_merchant: int = 300) -> dict:
    """Train once, then fold in up to `users_per_merchant` sampled test customers per shop."""
    run = train(cfg, Console(quiet=True))
    items = run.item_vectors
    vecs = items.numpy()
    rng = np.random.default_rng(cfg.federation.seed)
    temperature = run.cfg.local.temperature  # the chosen one, where local.temperature = 0
    rules, alpha = rules_for(run.cfg.local.loss), run.cfg.local.ials_alpha
    weight, width = block(run.result.content_match)  # folds in as the API does: u against the tower's part, then w p
    term = copurchase_choice.block(run.result.copurchase)  # and w x after it
    parts: dict[str, dict[str, MetricSums]] = {"learned": {}}
    seconds: dict[str, float] = {}
    for m in run.dataset.merchants:
        keep = np.flatnonzero(eligible_users(m.full_train, m.test))
        pick = np.sort(rng.choice(keep, size=min(users_per_merchant, len(keep)), replace=False))
        sub = MerchantData(m.name, m.user_ids[pick], m.train[pick], m.val[pick], m.test[pick])
        bias = run.result.item_biases.get(m.name)
        b = None if bias is None else bias.numpy()
        learned = run.result.user_embeddings[m.name][torch.from_numpy(pick)]
        parts["learned"][m.name] = evaluate_test(sub, learned, items, bias)
        baskets = sub.full_train
        rows = [baskets.indices[baskets.indptr[u] : baskets.indptr[u + 1]] for u in range(baskets.shape[0])]
        for method, reg, solve in rules:
            name = f"{method}" if method == "mean" else f"{method} reg={reg:g}"
            name += " (serving solve)" if solve == "serving" else ""
            t0 = time.perf_counter()
            fold = functools.partial(_fold_batches, baskets=rows, method=method, reg=reg, solve=solve,
                                     alpha=alpha, temperature=temperature, bias=b)  # fmt: skip
            folded = fold_in_with_match(fold, vecs, rows, weight, width, term).astype(vecs.dtype, copy=False)
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
            parts.setdefault(name, {})[m.name] = evaluate_test(sub, torch.from_numpy(folded), items, bias)
    out: dict = {
        "dataset": run.dataset.name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": f"fedrec evaluate-foldin --dataset {run.dataset.name} --users {users_per_merchant}",
        "users_per_merchant": users_per_merchant,
        "rules": {},
    }
    for name, by_merchant in parts.items():
        res = combine(by_merchant)
        n_users = res["users"]
        out["rules"][name] = {
            **{k: round(res["overall"][k], 4) for k in METRICS},
            "users": n_users,
            "ms_per_user": round(1000 * seconds[name] / n_users, 3) if name in seconds else None,
        }
        console.print(
            f"{name:>18}: recall@20 {res['overall']['recall@20']:.4f}  ndcg@20 {res['overall']['ndcg@20']:.4f}"
        )
    folds = {k: v for k, v in out["rules"].items() if k != "learned"}
    out["best"] = max(folds, key=lambda k: folds[k]["recall@20"])
    out["config"] = cfg.to_dict()
    return out


def _fold_batches(
    tower: np.ndarray,
    baskets: list[np.ndarray],
    method: str,
    reg: float,
    solve: str,
    alpha: float,
    temperature: float,
    bias: np.ndarray | None,
) -> np.ndarray:
    """One rule's user vectors for every basket, solved `BATCH` baskets at a time."""
    return np.concatenate([
        solve_ials_baskets(tower, baskets[i : i + BATCH], alpha, reg, bias) if method == "ials"
        else fold_in_many(tower, baskets[i : i + BATCH], method, reg, temperature, item_bias=bias, **SOLVES[solve])
        for i in range(0, len(baskets), BATCH)
    ])  # fmt: skip


def write_foldin_results(res: dict, results_dir: Path) -> Path:
    path = results_dir / f"foldin-{res['dataset']}.json"
    write_json(path, res)
    return path
