"""`make bench-train`: training at marketplace scale, on one machine.

Parts (each in a fresh process, so each peak RSS is its own):
- `switch`: one local step's cost, full softmax against sampled softmax, over catalogue sizes:
  where `LocalConfig.full_softmax_max_items` comes from.
- `losses`: on a small generated marketplace, test recall@20 and time per round of full softmax
  against sampled softmax, in-batch only and with uniform negatives (`local.uniform_negatives`).
- `uploads`: on the largest generated catalogue where a dense id table still fits, recall@20 and
  upload bytes per merchant for the encodings of fedrec/federated/upload.py and the id-row
  budget of `ModelConfig.id_rows`.
- `id_sharing`: on the `uploads` catalogue, with today's large-catalogue model (sampled softmax,
  the sampled user solve, the popularity prior chosen on validation), the dense id table against
  compositional ids at row budgets down to the 1M marketplace's sharing (about 45 products a
  row), over seeds: whether that sharing keeps recall@20 within 5% of dense, measured where dense
  still runs (one id row per product at 1M costs a dense Adam step over 64M numbers per batch).
- `user_solve`: on the `uploads` catalogue, the per-round user solve's sampled form (above the
  switch) against none, at a few weights: validation recall@20 by round and the released model's
  test recall@20.
- `large`: 1,000 merchants (a tenth sampled per round) on a 1,000,000-product generated
  marketplace (datasets/marketplace.py, ~5M purchases) with the default large-catalogue settings:
  seconds per round, peak RSS, upload bytes per merchant, and the test recall@20 of the model a
  fixed number of rounds releases (the best of every tenth round's validation).
- `popularity`: pooled popularity's test recall@20 on each of those catalogues (same customers).
- `time_to_target`: on ml100k-temporal (skipped without the shared MovieLens folder), the rounds
  and seconds the default federated configuration takes to reach 95% of the centralized model's
  best validation recall@20 (validation, not test: the target is a stopping rule).

Results: results/bench-train.json and .md.

    python -m fedrec.training.bench_train [--parts switch,losses,uploads,large,time_to_target] [--small]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import multiprocessing
import platform
import resource
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedrec.atomic import write_json, write_text
from fedrec.data import FederatedDataset, pooled
from fedrec.evaluation import combine_sums, merchant_metric_sums, sample_customers
from fedrec.features import ItemFeatures, build_item_features
from fedrec.federated.local import LocalConfig, local_update
from fedrec.federated.simulation import FederationConfig, run_federated
from fedrec.federated.upload import sparse_row_bytes
from fedrec.metrics import seed_std
from fedrec.model import (
    ModelConfig,
    id_table_rows,
    init_user_embeddings,
    item_embeddings,
    new_item_tower,
    scoring_vectors,
)
from fedrec.threads import use_threads

RESULTS = Path("results")
# The benchmarks measure the fedavg message (upload bytes, seconds): rowwise, which `auto` picks on
# catalogues with one id row per product, adds per-row weights to it.
PINNED_RULE = "fedavg"
PARTS = (
    "switch", "losses", "uploads", "id_sharing", "user_solve", "als_reference", "als_exact", "large", "popularity",
    "time_to_target", "flower_simulation",
)  # fmt: skip


@dataclass(frozen=True)
class BenchTrainConfig:
    products: int = 1_000_000
    merchants: int = 1000
    customers: int = 500_000
    fraction: float = 0.1
    rounds: int = 30
    id_rows: int = 16_384
    test_customers: int = 5  # per merchant, for the large run's recall@20
    compare_products: int = 100_000
    compare_merchants: int = 100
    compare_customers: int = 30_000
    compare_rounds: int = 10
    loss_products: int = 20_000
    loss_merchants: int = 20
    loss_customers: int = 20_000
    loss_rounds: int = 10
    # `id_sharing`: compositional row budgets R on the `uploads` catalogue (62,572 products with
    # purchases): 3.8 products a row (the default R) and 45, the 1M marketplace's sharing (734,164
    # products with purchases over its 16,384). 0 is the dense table.
    sharing_id_rows: tuple[int, ...] = (0, 16_384, 1_390)
    sharing_seeds: tuple[int, ...] = (0, 1, 2)
    user_solve_regs: tuple[float, ...] = (0.0, 3.0, 10.0, 30.0)  # 0: no user solve
    user_solve_rounds: int = 20
    user_solve_val_every: int = 5
    # implicit's ALS beside the user_solve part, chosen on validation among these (8 fits: the whole
    # of `make evaluate`'s ALS_GRID, 96 fits, would cost more than the part it stands beside)
    als_factors: tuple[int, ...] = (16, 64)
    als_regs: tuple[float, ...] = (0.1, 10.0)
    als_alphas: tuple[float, ...] = (5.0, 20.0)
    # The federated ALS beside them (`als_exact`): the pooled ALS's validation choice on this
    # catalogue (16 factors, reg 10, alpha 20 in implicit's terms, where a purchase weighs alpha; the
    # ials loss weighs it 1 + alpha), one ALS iteration a round.
    als_exact_dim: int = 16
    als_exact_reg: float = 10.0
    als_exact_alpha: float = 19.0
    als_exact_rounds: int = 20
    switch_sizes: tuple[int, ...] = (1_000, 10_000, 50_000, 100_000, 1_000_000)
    switch_steps: int = 20
    full_softmax_max_items: int = LocalConfig.full_softmax_max_items  # the small variant lowers it
    sim_merchants: tuple[int, ...] = (10, 100, 1000)
    sim_products: int = 5_000
    sim_customers_per_merchant: int = 50
    sim_rounds: int = 3
    sim_per_round: int = 100  # merchants sampled per round: all of them up to this many
    seed: int = 0
    device: str = "cpu"  # where the large run's local steps run (--device); its results key names it


SMALL = BenchTrainConfig(
    products=20_000,
    merchants=50,
    customers=10_000,
    fraction=0.2,
    rounds=2,
    id_rows=1024,
    compare_products=5_000,
    compare_merchants=10,
    compare_customers=3_000,
    compare_rounds=2,
    sharing_id_rows=(0, 256),
    sharing_seeds=(0, 1),
    loss_products=3_000,
    loss_merchants=5,
    loss_customers=1_000,
    loss_rounds=2,
    user_solve_regs=(0.0, 3.0),
    user_solve_rounds=2,
    user_solve_val_every=1,
    als_factors=(4,),
    als_regs=(0.1, 1.0),
    als_alphas=(5.0,),
    als_exact_dim=4,
    als_exact_rounds=2,
    switch_sizes=(1_000, 5_000),
    switch_steps=2,
    full_softmax_max_items=1_000,
    sim_merchants=(4,),
    sim_products=500,
    sim_customers_per_merchant=25,
    sim_rounds=2,
)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def marketplace(products: int, merchants: int, customers: int) -> tuple[FederatedDataset, ItemFeatures]:
    from fedrec.datasets.marketplace import MarketplaceConfig, load
    from fedrec.datasets.protocol import temporal_split

    ds = temporal_split(load(MarketplaceConfig(n_products=products, n_merchants=merchants, n_customers=customers)))
    return ds, build_item_features(ds.items, ModelConfig().hash_buckets)


def sampled_test_recall(res, ds: FederatedDataset, features: ItemFeatures, model: ModelConfig, cap: int) -> float:
    """Test recall@20 over at most `cap` customers per merchant (0: all), the catalogue ranked in full."""
    vecs = item_embeddings(res.item_state, features, model)
    return _sampled_recall(
        ds, cap, lambda m: scoring_vectors(res.user_embeddings[m.name], vecs, res.item_biases[m.name])
    )


def prior_fields(res, ds: FederatedDataset, features: ItemFeatures, model: ModelConfig, cap: int) -> dict:
    """The popularity prior the run chose on validation, and the released model's test recall@20
    without it (the prior is already in `res.item_biases`)."""
    if res.popularity is None:
        return {"popularity_prior_weight": None}
    offsets = res.popularity.offsets
    # shared by every merchant without a bias of its own (`popularity_prior.shifted`): no copies
    plain = dataclasses.replace(
        res, item_biases={k: None if b is offsets else b - offsets for k, b in res.item_biases.items()}
    )
    return {
        "popularity_prior_weight": res.popularity.weight,
        "popularity_prior_val_recall@20": {str(w): v for w, v in res.popularity.scores.items()},
        "test_recall@20_without_prior": sampled_test_recall(plain, ds, features, model, cap),
    }


def popularity_recall(ds: FederatedDataset, cap: int) -> float:
    """The same customers ranked by the pooled count of buyers before the cut-off: a reference."""
    counts = sum(np.asarray(m.full_train.sum(axis=0)).ravel() for m in ds.merchants)
    items = torch.from_numpy(np.asarray(counts, dtype=np.float32)[:, None])
    return _sampled_recall(ds, cap, lambda m: (torch.ones(m.n_users, 1), items))


def _sampled_recall(ds: FederatedDataset, cap: int, vectors) -> float:
    parts = []
    for i, m in enumerate(ds.merchants):
        rows = sample_customers(m.test, cap, i)
        rows = np.arange(m.n_users) if rows is None else rows
        users, items = vectors(m)
        pick = torch.from_numpy(rows)
        parts.append(merchant_metric_sums(users[pick], items, m.full_train[rows], m.test[rows], ("recall@20",)))
    return combine_sums(parts).means()["recall@20"]


def switch_point(cfg: BenchTrainConfig) -> dict:
    """Milliseconds per local step (batch 256, forward, backward, Adam) by loss and catalogue size."""
    torch.set_num_threads(2)
    rng = np.random.default_rng(cfg.seed)
    rows = []
    for n in cfg.switch_sizes:
        features = ItemFeatures(torch.from_numpy(rng.integers(0, 16384, (n, 12))), 16384)
        model = ModelConfig(id_rows=cfg.id_rows)
        state = new_item_tower(n, model, cfg.seed).state_dict()
        users = 256 * cfg.switch_steps
        train = _random_purchases(users, n, rng)
        u = init_user_embeddings(users, model, torch.Generator().manual_seed(0))
        row = {"items": n, "id_rows": id_table_rows(n, model)}
        for loss in ("softmax", "sampled_softmax"):
            local = LocalConfig(loss=loss, user_solve_reg=0.0, full_softmax_max_items=10**9)
            local_update(state, u[:256], train[:256], features, model, local, 0)  # warm-up
            t = time.perf_counter()
            res = local_update(state, u, train, features, model, local, 1)
            row[f"{loss}_ms_per_step"] = 1000 * (time.perf_counter() - t) / res.num_steps
        rows.append(row)
        print(f"switch: {row}", flush=True)
    return {"batch_size": 256, "rows": rows, "peak_rss_mb": _peak_mb()}


def _random_purchases(users: int, n: int, rng: np.random.Generator):
    import scipy.sparse as sp

    cols = rng.integers(0, n, users)
    return sp.csr_matrix((np.ones(users, dtype=np.float32), (np.arange(users), cols)), shape=(users, n))


def fixed_rounds(rounds: int, seed: int) -> FederationConfig:
    """Exactly `rounds` rounds, validated once after the last, no refit: what a variant costs."""
    return FederationConfig(
        aggregation=PINNED_RULE, rounds=rounds, patience=0, val_every=rounds, seed=seed, refit=False
    )


def losses(cfg: BenchTrainConfig) -> dict:
    """Test recall@20 and seconds per round of full softmax, in-batch sampled softmax, and sampled
    softmax with uniform negatives mixed in, on one small generated marketplace (one seed)."""
    torch.set_num_threads(2)
    ds, features = marketplace(cfg.loss_products, cfg.loss_merchants, cfg.loss_customers)
    fed = fixed_rounds(cfg.loss_rounds, cfg.seed)
    base = LocalConfig(user_solve_reg=0.0, full_softmax_max_items=10**9)
    variants = {
        "softmax": base,
        "sampled_in_batch": dataclasses.replace(base, loss="sampled_softmax", uniform_negatives=0),
        "sampled_mixed_1024": dataclasses.replace(base, loss="sampled_softmax", uniform_negatives=1024),
    }
    out = {}
    for name, local in variants.items():
        t = time.perf_counter()
        res = run_federated(ds, features, ModelConfig(), local, fed)
        seconds = (time.perf_counter() - t) / len(res.history)
        recall = sampled_test_recall(res, ds, features, ModelConfig(), 0)
        out[name] = {"recall@20": recall, "seconds_per_round": seconds}
        print(f"losses {name}: {out[name]}", flush=True)
    return {"items": ds.n_items, "merchants": len(ds.merchants), "rounds": cfg.loss_rounds, "seed": cfg.seed,
            "user_solve": False, "variants": out}  # fmt: skip


def uploads(cfg: BenchTrainConfig) -> dict:
    """Recall@20 and bytes per merchant per round for each upload encoding, on one catalogue."""
    torch.set_num_threads(2)
    ds, features = marketplace(cfg.compare_products, cfg.compare_merchants, cfg.compare_customers)
    local = LocalConfig(loss="sampled_softmax", user_solve_reg=0.0, sampled_user_solve_reg=0.0)
    fed = fixed_rounds(cfg.compare_rounds, cfg.seed)
    variants = {
        "dense_fp32": (ModelConfig(id_rows=0), "float32"),
        "dense_fp16": (ModelConfig(id_rows=0), "float16"),
        "compositional_fp32": (ModelConfig(id_rows=cfg.id_rows), "float32"),
        "compositional_fp16": (ModelConfig(id_rows=cfg.id_rows), "float16"),
        "content_only": (ModelConfig(use_item_id=False), "float32"),
    }
    out = {}
    for name, (model, precision) in variants.items():
        sparse: list[int] = []

        def measure(_name: str, message, model=model, sparse=sparse) -> None:
            if model.id_rows == 0 and model.use_item_id:
                sparse.append(sparse_row_bytes(message.tensors))

        f = dataclasses.replace(fed, upload_precision=precision)
        t = time.perf_counter()
        res = run_federated(ds, features, model, local, f, on_message=measure)
        out[name] = {
            "recall@20": sampled_test_recall(res, ds, features, model, 0),
            "upload_bytes_per_merchant": int(np.mean([h.upload_bytes for h in res.history])),
            "seconds_per_round": (time.perf_counter() - t) / len(res.history),
        }
        if sparse and precision == "float32":  # lossless: the dense run's recall, sent as touched rows
            out["touched_rows_fp32"] = {
                "recall@20": out[name]["recall@20"],
                "upload_bytes_per_merchant": int(np.mean(sparse)),
                "reveals_sold_set": True,
            }
        print(f"uploads {name}: {out[name]}", flush=True)
    base = out["dense_fp32"]["recall@20"]
    for entry in out.values():
        entry["recall_vs_dense_fp32"] = entry["recall@20"] / base if base else None
    return {
        "items": ds.n_items,
        "merchants": len(ds.merchants),
        "interactions": int(sum(m.train.nnz + m.val.nnz + m.test.nnz for m in ds.merchants)),
        "rounds": cfg.compare_rounds,
        "id_rows": cfg.id_rows,
        "seed": cfg.seed,
        "variants": out,
    }


def id_sharing(cfg: BenchTrainConfig) -> dict:
    """Dense id rows against compositional ones at several row budgets, with the default model for
    a catalogue above the switch, over `sharing_seeds`: test recall@20 of every customer with the
    popularity prior (as released) and without it (the trained vectors alone)."""
    torch.set_num_threads(2)
    ds, features = marketplace(cfg.compare_products, cfg.compare_merchants, cfg.compare_customers)
    local = LocalConfig(full_softmax_max_items=cfg.full_softmax_max_items)
    out: dict[str, dict] = {}
    for rows in cfg.sharing_id_rows:
        model = ModelConfig(id_rows=rows)
        name = "dense" if rows == 0 else f"compositional_R{rows}"
        runs = []
        for seed in cfg.sharing_seeds:
            t = time.perf_counter()
            res = run_federated(ds, features, model, local, fixed_rounds(cfg.compare_rounds, seed))
            run = {
                "seed": seed,
                "recall@20": sampled_test_recall(res, ds, features, model, 0),
                **prior_fields(res, ds, features, model, 0),
                "upload_bytes_per_merchant": int(np.mean([h.upload_bytes for h in res.history])),
                "seconds_per_round": (time.perf_counter() - t) / len(res.history),
            }
            runs.append(run)
            print(f"id_sharing {name} seed {seed}: {run}", flush=True)
        table = id_table_rows(ds.n_items, model)  # 0 (one row per product) where R is not below half the catalogue
        out[name] = {
            "id_rows": table,
            "products_per_row": ds.n_items / table if table else 1.0,
            **_mean_std(runs, "recall@20"),
            **_mean_std(runs, "test_recall@20_without_prior"),
            "upload_bytes_per_merchant": runs[0]["upload_bytes_per_merchant"],
            "runs": runs,
        }
    return with_ratios_to_dense(
        {
            "items": ds.n_items,
            "merchants": len(ds.merchants),
            "rounds": cfg.compare_rounds,
            "seeds": list(cfg.sharing_seeds),
            "popularity_test_recall@20": popularity_recall(ds, 0),
            "variants": out,
        }
    )


def with_ratios_to_dense(result: dict) -> dict:
    """Each variant's recalls as a share of the dense table's (None where there is no dense run)."""
    dense = result["variants"].get("dense")
    for entry in result["variants"].values():
        for key in ("recall@20", "test_recall@20_without_prior"):
            entry[f"{key}_vs_dense"] = entry[key] / dense[key] if dense and dense[key] else None
    return result


def merged_sharing(old: dict | None, new: dict) -> dict:
    """A run of some `id_sharing` budgets (`--sharing-id-rows`) merged into the last results on the
    same catalogue, rounds and seeds, so one table holds them all; anything else replaces them."""
    same = old is not None and all(old.get(k) == new[k] for k in ("items", "merchants", "rounds", "seeds"))
    if not same:
        return new
    commands = old.get("commands", []) + new.get("commands", [])
    return with_ratios_to_dense({**new, "variants": {**old["variants"], **new["variants"]}, "commands": commands})


def _mean_std(runs: list[dict], key: str) -> dict:
    """The mean over runs of `key` and its spread as every report states it (`seed_std`)."""
    values = [r[key] for r in runs]
    return {key: float(np.mean(values)), f"{key}_std": seed_std(values)}


def seconds_per_training_round(history: list) -> float:
    """Mean seconds of the rounds that did not validate (all rounds where every one did): what a
    round of training costs, without the validation the benchmark adds."""
    plain = [h for h in history if h.val_recall_at_20 is None] or history
    return float(np.mean([h.seconds for h in plain]))


def validation_curve(history: list) -> dict[int, float]:
    """Validation recall@20 by round, for the rounds that validated."""
    return {h.round: h.val_recall_at_20 for h in history if h.val_recall_at_20 is not None}


def user_solve(cfg: BenchTrainConfig) -> dict:
    """Above the full-softmax switch, the per-round user solve in its sampled form against none, and
    its weight, on the `uploads` catalogue: validation recall@20 every `user_solve_val_every` rounds
    (every customer), the best round released, as `fedrec train` does without the refit."""
    torch.set_num_threads(2)
    ds, features = marketplace(cfg.compare_products, cfg.compare_merchants, cfg.compare_customers)
    model = ModelConfig(id_rows=cfg.id_rows)
    fed = FederationConfig(
        aggregation=PINNED_RULE, rounds=cfg.user_solve_rounds, patience=0, val_every=cfg.user_solve_val_every,
        seed=cfg.seed, refit=False,
    )  # fmt: skip
    out = {}
    for reg in cfg.user_solve_regs:
        local = LocalConfig(full_softmax_max_items=cfg.full_softmax_max_items, sampled_user_solve_reg=reg)
        res = run_federated(ds, features, model, local, fed)
        out[f"sampled_user_solve_reg={reg}"] = {
            "val_recall@20_by_round": validation_curve(res.history),
            "released_round": res.best_round,
            "test_recall@20": sampled_test_recall(res, ds, features, model, 0),
            **prior_fields(res, ds, features, model, 0),
            "seconds_per_round": seconds_per_training_round(res.history),
        }
        print(f"user_solve reg {reg}: {out[f'sampled_user_solve_reg={reg}']}", flush=True)
    return {"items": ds.n_items, "merchants": len(ds.merchants), "rounds": cfg.user_solve_rounds, "seed": cfg.seed,
            "id_rows": cfg.id_rows, "popularity_test_recall@20": popularity_recall(ds, 0), "variants": out}  # fmt: skip


def als_reference(cfg: BenchTrainConfig) -> dict:
    """implicit's ALS on the pooled data of the `user_solve` catalogue: settings chosen on the
    validation slice (`als_*`), refit on train + validation, test recall@20 of every customer. A
    centralized reference beside popularity for what the federated model reaches there."""
    from fedrec.baselines import implicit_als
    from fedrec.training.evaluate import _split_rows, choose_als_settings

    ds, _ = marketplace(cfg.compare_products, cfg.compare_merchants, cfg.compare_customers)
    grid = {"factors": cfg.als_factors, "regularization": cfg.als_regs, "alpha": cfg.als_alphas}
    settings, scores = choose_als_settings(ds, (cfg.seed,), grid)
    users, items = implicit_als(pooled(ds).full_train, **settings, seed=cfg.seed)
    rows = _split_rows(ds, users)
    out = {
        "items": ds.n_items,
        "seed": cfg.seed,
        "settings": settings,
        "val_recall@20": scores,
        "test_recall@20": _sampled_recall(ds, 0, lambda m: (rows[m.name], items)),
    }
    print(f"als_reference: {out}", flush=True)
    return out


def als_exact(cfg: BenchTrainConfig) -> dict:
    """Federated ALS on the `user_solve` catalogue: the ials loss with the exact item step (each
    merchant sends its sums, the coordinator solves; in-process, `fedrec/federated/ials_item_step.py`),
    an id-only tower with one row per product, at `als_reference`'s choice. Whether the federation
    reaches the pooled ALS at a size where the softmax tower stays below it, and what the message
    costs: n_items x (dim^2 + dim) + dim^2 floats per merchant per round, which grows with the
    catalogue (the exact step has no compositional or sampled form)."""
    torch.set_num_threads(2)
    ds, features = marketplace(cfg.compare_products, cfg.compare_merchants, cfg.compare_customers)
    model = ModelConfig(dim=cfg.als_exact_dim, use_content=False, id_rows=0, content_match_weights=())
    # Plain ALS, as the reference: with the switch above the catalogue, no popularity prior is
    # added after training (the exact step itself runs above the switch too).
    local = LocalConfig(
        loss="ials", ials_item_step="exact", ials_alpha=cfg.als_exact_alpha, user_solve_reg=cfg.als_exact_reg,
        temperature=1.0, full_softmax_max_items=max(ds.n_items, cfg.full_softmax_max_items),
    )  # fmt: skip
    # Validated every round and released as `fedrec train` releases (the best round, refit on train +
    # validation), so its test recall compares with `als_reference`'s fit on the same data, and its
    # validation curve (train alone) with that reference's validation score.
    fed = FederationConfig(rounds=cfg.als_exact_rounds, patience=0, seed=cfg.seed, refit=True)
    res = run_federated(ds, features, model, local, fed)
    dim = cfg.als_exact_dim
    out = {
        "items": ds.n_items,
        "merchants": len(ds.merchants),
        "rounds": cfg.als_exact_rounds,
        "seed": cfg.seed,
        "settings": {"dim": dim, "reg": cfg.als_exact_reg, "ials_alpha": cfg.als_exact_alpha},
        "val_recall@20_by_round": validation_curve(res.history),
        "released_round": res.best_round,
        "refit_rounds": res.refit_rounds,
        "test_recall@20": sampled_test_recall(res, ds, features, model, 0),
        "seconds_per_round": seconds_per_training_round(res.history),  # validation included: every round has it
        "upload_bytes_per_merchant": 4 * (ds.n_items * (dim * dim + dim) + dim * dim),
        "peak_rss_mb": _peak_mb(),
    }
    print(f"als_exact: {out}", flush=True)
    return out


def large(cfg: BenchTrainConfig) -> dict:
    """The 1,000-merchant, 1M-product run with the default settings for a large catalogue."""
    torch.set_num_threads(2)
    t = time.perf_counter()
    ds, features = marketplace(cfg.products, cfg.merchants, cfg.customers)
    prepare = time.perf_counter() - t
    model = ModelConfig(id_rows=cfg.id_rows)  # compositional ids above 2 x id_rows products, as by default
    # The default loss, softmax, switches to sampled softmax above full_softmax_max_items.
    local = LocalConfig(full_softmax_max_items=cfg.full_softmax_max_items, device=cfg.device)
    # Validated every tenth round on a sample of customers, and the best of those released, as
    # `fedrec train` does without the refit; rounds that validate are left out of the timing.
    fed = FederationConfig(
        aggregation=PINNED_RULE,
        rounds=cfg.rounds,
        fraction=cfg.fraction,
        patience=0,
        val_every=max(1, cfg.rounds // 3),
        val_customers=5,
        seed=cfg.seed,
        refit=False,
    )
    res = run_federated(ds, features, model, local, fed, on_round=lambda h: print(f"large: round {h.round} "
                        f"{h.seconds:.1f} s, validation recall@20 {h.val_recall_at_20}", flush=True))  # fmt: skip
    recall = sampled_test_recall(res, ds, features, model, cfg.test_customers)
    catalogue = ds.n_items + (0 if ds.new_items is None else ds.new_items.height)
    return {
        "merchants": len(ds.merchants),
        "merchants_per_round": len(res.history[0].merchants),
        "items": catalogue,
        "items_with_purchases": ds.n_items,
        "interactions": int(sum(m.train.nnz + m.val.nnz + m.test.nnz for m in ds.merchants)),
        "customers": int(sum(m.n_users for m in ds.merchants)),
        "rounds": len(res.history),
        "seconds_per_round": seconds_per_training_round(res.history),
        "seconds_to_prepare_data": prepare,
        "peak_rss_mb": _peak_mb(),
        "upload_bytes_per_merchant": int(np.mean([h.upload_bytes for h in res.history])),
        "recall@20": recall,
        **prior_fields(res, ds, features, model, cfg.test_customers),
        "released_round": res.best_round,
        "val_recall@20_by_round": validation_curve(res.history),
        "sampled_user_solve_reg": local.sampled_user_solve_reg,
        "popularity_recall@20": popularity_recall(ds, cfg.test_customers),
        "recall_customers_per_merchant": cfg.test_customers,
        "id_rows": cfg.id_rows,
        "loss": "sampled_softmax (the default softmax, switched above full_softmax_max_items)",
        "full_softmax_max_items": cfg.full_softmax_max_items,
        **_device_fields(cfg.device),
    }


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {multiprocessing.cpu_count()} cores"


def _device_fields(device: str) -> dict:
    """The card that ran the local steps, and its peak memory, where that was not the CPU."""
    if device == "cpu":
        return {}
    return {
        "device": device,
        "device_name": torch.cuda.get_device_name(torch.device(device)),
        "device_peak_memory_mb": torch.cuda.max_memory_allocated(torch.device(device)) / 2**20,
        "torch": torch.__version__,
        "command": f"python -m fedrec.training.bench_train --parts large --device {device}",
        "date": dt.date.today().isoformat(),
        "machine": _machine(),
    }


def popularity_references(cfg: BenchTrainConfig) -> dict:
    """Test recall@20 of pooled popularity on each generated catalogue above, for the same customers
    as the part that trained there: what a model must beat to have learnt anything."""
    out = {}
    for part, (products, merchants, customers, cap) in {
        "losses": (cfg.loss_products, cfg.loss_merchants, cfg.loss_customers, 0),
        "uploads": (cfg.compare_products, cfg.compare_merchants, cfg.compare_customers, 0),
        "large": (cfg.products, cfg.merchants, cfg.customers, cfg.test_customers),
    }.items():
        ds, _ = marketplace(products, merchants, customers)
        out[part] = {"items": ds.n_items, "recall@20": popularity_recall(ds, cap)}
        print(f"popularity {part}: {out[part]}", flush=True)
    return out


def time_to_target(cfg: BenchTrainConfig) -> dict | None:
    """Rounds and seconds for the default federated run to reach 95% of the centralized best
    validation recall@20 on ml100k-temporal (one torch thread, as `make evaluate`)."""
    from fedrec.config import load_config, parse_sets
    from fedrec.errors import DataError
    from fedrec.training.cli import default_config_path
    from fedrec.training.data import load_dataset

    torch.set_num_threads(1)
    config = load_config(
        default_config_path("movielens-100k"),
        parse_sets(["federation.patience=0", "federation.refit=false", f"federation.aggregation={PINNED_RULE}"]),
    )
    try:
        ds = load_dataset(config.data, config.federation.seed)
    except DataError as exc:
        return {"skipped": str(exc)}
    features = build_item_features(ds.items, config.model.hash_buckets)
    central = FederatedDataset(ds.name, ds.items, [pooled(ds)], ds.protocol)
    cen = run_federated(central, features, config.model, config.local, config.federation)
    target = 0.95 * max(h.val_recall_at_20 for h in cen.history)
    fed = run_federated(ds, features, config.model, config.local, config.federation)
    elapsed, reached = 0.0, None
    for h in fed.history:
        elapsed += h.seconds
        if h.val_recall_at_20 >= target:
            reached = {"rounds": h.round, "seconds": elapsed}
            break
    return {
        "dataset": ds.name,
        "centralized_best_val_recall@20": target / 0.95,
        "target_val_recall@20": target,
        "federated_best_val_recall@20": max(h.val_recall_at_20 for h in fed.history),
        "reached": reached,
        "rounds_run": len(fed.history),
        "seed": config.federation.seed,
    }


def _sim_workload(n: int, cfg: BenchTrainConfig):  # noqa: ANN202
    """The side-by-side's data and settings for n merchants: FedAvg, fixed rounds, no refit, at
    most `sim_per_round` merchants a round, plaintext (the simulation engine has no SecAgg+ here)."""
    from fedrec.config import load_config

    ds, features = marketplace(cfg.sim_products, n, cfg.sim_customers_per_merchant * n)
    run_cfg = load_config(
        None,
        {
            "federation.aggregation": PINNED_RULE,
            "federation.rounds": cfg.sim_rounds,
            "federation.patience": 0,
            "federation.refit": False,
            "federation.fraction": min(1.0, cfg.sim_per_round / n),
            "federation.seed": cfg.seed,
            "network.secagg": False,
            "network.min_merchants": 1,
            # Flower validates only the round's merchants (validation rides on the training
            # message): the in-process runtime does the same here, not all 1,000 every round.
            "federation.val_scope": "round",
            # Both runtimes get the machine's cores the same way: Flower one Ray worker per core, the
            # in-process runtime one merchant thread per core (the networked runtime ignores workers).
            "threads": 1,
            "federation.workers": multiprocessing.cpu_count(),
        },
    )
    return ds, features, run_cfg


def _sim_inprocess(n: int, cfg: BenchTrainConfig) -> dict:
    from fedrec.evaluation import evaluate_test_all

    ds, features, run_cfg = _sim_workload(n, cfg)
    use_threads(run_cfg.threads)
    res = run_federated(ds, features, run_cfg.model, run_cfg.local, run_cfg.federation)
    vecs = item_embeddings(res.item_state, features, run_cfg.model)
    test = evaluate_test_all(ds.merchants, res.user_embeddings, vecs, res.item_biases)
    return {
        "seconds": [h.seconds for h in res.history],
        "recall@20": test["overall"]["recall@20"],
        "peak_rss_mb": _peak_mb(),
        "merchants_per_round": len(res.history[0].merchants),
        "items": ds.n_items,
        "customers": int(sum(m.n_users for m in ds.merchants)),
    }


def _sim_flower(n: int, cfg: BenchTrainConfig) -> dict:
    import shutil
    import tempfile

    from fedrec.federated.merchant_node import CATALOGUE, write_bundles
    from fedrec.training.flower_simulation import simulate

    ds, _, run_cfg = _sim_workload(n, cfg)
    work = Path(tempfile.mkdtemp(prefix="fedrec-flower-simulation-"))
    try:
        bundles = write_bundles(ds, work / "bundles")
        summary = simulate(run_cfg.to_dict(), bundles, bundles[0] / CATALOGUE, work / "coordinator",
                           multiprocessing.cpu_count())  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rounds = [h for h in summary["history"] if h["round"] > 0]
    return {
        "seconds": [h["seconds"] for h in rounds],
        "recall@20": summary["test"]["recall@20"],
        "peak_rss_mb": summary["peak_rss_mb"],
        "seconds_total": summary["seconds_total"],
        "merchants_per_round": rounds[0]["merchants"],
    }


def flower_simulation(cfg: BenchTrainConfig) -> list[dict] | None:
    """The same FedAvg workload in the in-process runtime and in Flower's simulation engine (Ray)
    running fedrec's own ServerApp and ClientApp, each runtime in a fresh process. Skipped without
    Ray (`make simulation-setup`)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        print("flower_simulation: skipped, Ray is not installed (make simulation-setup)", flush=True)
        return None
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for n in cfg.sim_merchants:
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            ours = pool.submit(_sim_inprocess, n, cfg).result()
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            theirs = pool.submit(_sim_flower, n, cfg).result()
        row = {
            "merchants": n,
            "merchants_per_round": ours["merchants_per_round"],
            "items": ours["items"],
            "customers": ours["customers"],
            "rounds": cfg.sim_rounds,
            "fedrec_seconds_per_round": float(np.mean(ours["seconds"])),
            "flower_seconds_per_round": float(np.mean(theirs["seconds"])),
            "ratio": float(np.mean(theirs["seconds"]) / np.mean(ours["seconds"])),
            # Flower's first round also starts the Ray workers (each imports torch and fedrec)
            "fedrec_seconds_per_round_after_first": float(np.mean(ours["seconds"][1:])),
            "flower_seconds_per_round_after_first": float(np.mean(theirs["seconds"][1:])),
            "ratio_after_first": float(np.mean(theirs["seconds"][1:]) / np.mean(ours["seconds"][1:])),
            "fedrec_seconds": ours["seconds"],
            "flower_seconds": theirs["seconds"],
            "fedrec_recall@20": ours["recall@20"],
            "flower_recall@20": theirs["recall@20"],
            "fedrec_peak_rss_mb": ours["peak_rss_mb"],
            "flower_peak_rss_mb": theirs["peak_rss_mb"],
            "flower_seconds_total": theirs["seconds_total"],
        }
        print(f"flower_simulation: {row}", flush=True)
        rows.append(row)
    return rows


def _run_part(part: str, cfg: BenchTrainConfig) -> dict | list | None:
    parts = {"switch": switch_point, "losses": losses, "uploads": uploads, "id_sharing": id_sharing,
             "user_solve": user_solve,
             "als_reference": als_reference, "als_exact": als_exact, "large": large}  # fmt: skip
    parts["popularity"] = popularity_references
    return {**parts, "time_to_target": time_to_target, "flower_simulation": flower_simulation}[part](cfg)


def _maybe(value: float | None, spec: str) -> str:
    """A number in `spec`, or "-" where the run had none (a result from before the field existed)."""
    return "-" if value is None else format(value, spec)


def markdown(res: dict) -> str:
    lines = ["# bench-train", "", f"Machine: {res['machine']}; command: `{res['command']}`.", ""]
    if "switch" in res:
        lines += ["## Local step cost (ms per step, batch 256)", "", "| items | full softmax | sampled softmax |"]
        lines += ["|---:|---:|---:|"]
        for r in res["switch"]["rows"]:
            lines.append(
                f"| {r['items']:,} | {r['softmax_ms_per_step']:.1f} | {r['sampled_softmax_ms_per_step']:.1f} |"
            )
        lines.append("")
    if "losses" in res:
        g = res["losses"]
        lines += [
            f"## Loss ({g['items']:,} products, {g['merchants']} merchants, {g['rounds']} rounds, seed {g['seed']})",
            "",
            "| loss | recall@20 | s per round |",
            "|---|---:|---:|",
        ]
        lines += [f"| {k} | {v['recall@20']:.4f} | {v['seconds_per_round']:.1f} |" for k, v in g["variants"].items()]
        lines.append("")
    if "uploads" in res:
        u = res["uploads"]
        lines += [
            f"## Upload encodings ({u['items']:,} products, {u['merchants']} merchants, {u['rounds']} rounds, "
            f"id_rows {u['id_rows']}, seed {u['seed']})",
            "",
            "| encoding | MB per merchant per round | recall@20 | vs dense fp32 |",
            "|---|---:|---:|---:|",
        ]
        for name, v in u["variants"].items():
            lines.append(
                f"| {name} | {v['upload_bytes_per_merchant'] / 1e6:.2f} | {v['recall@20']:.4f} | "
                f"{v['recall_vs_dense_fp32']:.2f} |"
            )
        lines.append("")
    if "id_sharing" in res:
        g = res["id_sharing"]
        lines += [
            f"## Compositional ids against one row per product ({g['items']:,} products, {g['merchants']} "
            f"merchants, {g['rounds']} rounds, seeds {', '.join(map(str, g['seeds']))}; test recall@20 of every "
            f"customer, mean ± std; popularity {g['popularity_test_recall@20']:.4f})",
            "",
            "| id table | products per row | MB per merchant per round | recall@20 (with the prior) | vs dense | "
            "without the prior | vs dense |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, v in g["variants"].items():
            lines.append(
                f"| {name} | {v['products_per_row']:.1f} | {v['upload_bytes_per_merchant'] / 1e6:.2f} | "
                f"{v['recall@20']:.4f} ± {v['recall@20_std']:.4f} | {_maybe(v['recall@20_vs_dense'], '.3f')} | "
                f"{v['test_recall@20_without_prior']:.4f} ± {v['test_recall@20_without_prior_std']:.4f} | "
                f"{_maybe(v['test_recall@20_without_prior_vs_dense'], '.3f')} |"
            )
        lines.append("")
    if "user_solve" in res:
        g = res["user_solve"]
        lines += [
            f"## User solve above the switch ({g['items']:,} products, {g['merchants']} merchants, {g['rounds']} "
            f"rounds, seed {g['seed']}; popularity {g['popularity_test_recall@20']:.4f})",
            "",
            "| variant | validation recall@20 by round | released round | prior weight | test recall@20 | "
            "without the prior |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for name, v in g["variants"].items():
            curve = ", ".join(f"{r}: {x:.4f}" for r, x in v["val_recall@20_by_round"].items())
            lines.append(
                f"| {name} | {curve} | {v['released_round']} | {_maybe(v.get('popularity_prior_weight'), 'g')} | "
                f"{v['test_recall@20']:.4f} | {_maybe(v.get('test_recall@20_without_prior'), '.4f')} |"
            )
        lines.append("")
    if "als_reference" in res:
        g = res["als_reference"]
        lines += [
            f"implicit's ALS on the pooled data of the same catalogue ({g['items']:,} products; "
            + ", ".join(f"{k} {v:g}" for k, v in g["settings"].items())
            + f", chosen on validation): test recall@20 {g['test_recall@20']:.4f}.",
            "",
        ]
    if "als_exact" in res:
        g = res["als_exact"]
        curve = ", ".join(f"{r}: {x:.4f}" for r, x in g["val_recall@20_by_round"].items())
        lines += [
            "Federated ALS (the exact item step, in-process; "
            + ", ".join(f"{k} {v:g}" for k, v in g["settings"].items())
            + f"): test recall@20 {g['test_recall@20']:.4f} at round {g['released_round']} of {g['rounds']} "
            f"(validation by round: {curve}); {g['seconds_per_round']:.1f} s per round, "
            f"{g['upload_bytes_per_merchant'] / 1e6:.1f} MB per merchant per round.",
            "",
        ]
    if "large" in res:
        g = res["large"]
        lines += [
            "## Marketplace scale",
            "",
            f"{g['merchants']:,} merchants ({g['merchants_per_round']} per round), {g['items']:,} products "
            f"({g['items_with_purchases']:,} with purchases), {g['interactions']:,} purchases: "
            f"{g['seconds_per_round']:.1f} s per round, peak RSS {g['peak_rss_mb']:,.0f} MB, "
            f"{g['upload_bytes_per_merchant'] / 1e6:.1f} MB uploaded per merchant per round, "
            f"recall@20 {g['recall@20']:.4f} for the model {g['rounds']} rounds release (round "
            f"{g.get('released_round', g['rounds'])}, the best validated; popularity prior weight "
            f"{_maybe(g.get('popularity_prior_weight'), 'g')}, without it "
            f"{_maybe(g.get('test_recall@20_without_prior'), '.4f')}; pooled popularity on the same "
            f"customers: {g['popularity_recall@20']:.4f}).",
            "",
        ]
    if "large_cuda" in res:
        g = res["large_cuda"]
        lines += [
            f"The same run with the local steps on {g['device_name']} (`{g['command']}`, {g['date']}): "
            f"{g['seconds_per_round']:.1f} s per round, peak GPU memory {g['device_peak_memory_mb']:,.0f} MB, "
            f"peak RSS {g['peak_rss_mb']:,.0f} MB, recall@20 {g['recall@20']:.4f} after {g['rounds']} rounds.",
            "",
        ]
    if "popularity" in res:
        refs = ", ".join(f"{k} {v['recall@20']:.4f} ({v['items']:,} products)" for k, v in res["popularity"].items())
        lines += ["## Pooled popularity on the same customers", "", refs + ".", ""]
    if res.get("flower_simulation"):
        lines += [
            "## In-process runtime vs Flower's simulation engine (Ray), the same FedAvg workload",
            "",
            "| merchants | per round | fedrec s/round | Flower s/round | ratio | ratio after round 1 "
            "| fedrec recall@20 | Flower recall@20 | fedrec peak RSS MB | Flower peak RSS MB |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['merchants']:,} | {r['merchants_per_round']} | {r['fedrec_seconds_per_round']:.2f} | "
            f"{r['flower_seconds_per_round']:.2f} | {r['ratio']:.1f}x | {r['ratio_after_first']:.1f}x | "
            f"{r['fedrec_recall@20']:.4f} | "
            f"{r['flower_recall@20']:.4f} | {r['fedrec_peak_rss_mb']:,.0f} | {r['flower_peak_rss_mb']:,.0f} |"
            for r in res["flower_simulation"]
        ]
        lines.append("")
    t = res.get("time_to_target")
    if t and "reached" in t:
        got = t["reached"]
        when = f"{got['rounds']} rounds, {got['seconds']:.0f} s" if got else "not reached"
        lines += ["## Time to target", "", f"{t['dataset']}: 95% of centralized best validation recall@20 "
                  f"({t['target_val_recall@20']:.4f}): {when}.", ""]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--small", action="store_true", help="The CI-sized variant (seconds, not minutes).")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--device", default="cpu", help="Where the large part's local steps run (cpu, cuda).")
    parser.add_argument(
        "--sharing-id-rows",
        default="",
        help="id_sharing's row budgets, e.g. 4096 (0: the dense table); merged into its last results.",
    )
    args = parser.parse_args()
    cfg = dataclasses.replace(SMALL if args.small else BenchTrainConfig(), device=args.device)
    if args.sharing_id_rows:
        try:
            budgets = tuple(int(x) for x in args.sharing_id_rows.split(","))
        except ValueError:
            parser.error(f"--sharing-id-rows {args.sharing_id_rows!r}: give whole numbers, such as 0,4096")
        if any(b < 0 for b in budgets):
            parser.error(f"--sharing-id-rows {args.sharing_id_rows!r}: a row budget cannot be negative")
        cfg = dataclasses.replace(cfg, sharing_id_rows=budgets)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {PARTS}")
    target = args.out / "bench-train.json"
    # The parts not run this time keep their last results (same machine and config assumed).
    res = json.loads(target.read_text()) if target.is_file() and not args.small else {}
    res.update(
        machine=_machine(),
        command="make bench-train" + (" (--small)" if args.small else ""),
        date=dt.date.today().isoformat(),
        config=dataclasses.asdict(cfg),
    )
    for part in parts:
        # A run on another device keeps the CPU's results beside it: "large" and "large_cuda".
        key = part if cfg.device == "cpu" or part != "large" else f"large_{torch.device(cfg.device).type}"
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            result = pool.submit(_run_part, part, cfg).result()
        if part == "id_sharing":  # run in pieces: which command made which variants
            result["commands"] = [shlex.join(["python", "-m", "fedrec.training.bench_train", *sys.argv[1:]])]
            result = merged_sharing(res.get(key), result)
        res[key] = result
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(target, res)
    write_text(args.out / "bench-train.md", markdown(res) + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
