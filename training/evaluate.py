"""`fedrec evaluate`: federated vs centralized vs local-only vs popularity vs implicit ALS.

All neural variants share one code path: centralized is the federated loop with one client
holding the pooled data; local-only is the loop run by each merchant on its own data.
Writes results/evaluation-<dataset>.json, a markdown table and a recall@20-per-round plot.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
from rich.console import Console

from fedrec import served_weight
from fedrec.atomic import write_json, write_text, write_with
from fedrec.baselines import ALS_GRID, EASE_LAMBDAS, KNN_GRID, als_fold_in, ease, implicit_als, item_knn, popularity
from fedrec.config import RunConfig
from fedrec.content_profiles import fold_in_with_match
from fedrec.data import FederatedDataset, pooled
from fedrec.errors import FedrecError
from fedrec.evaluation import (
    MetricSums,
    combine,
    evaluate_test,
    evaluate_test_all,
    merchant_metric_sums,
    popularity_weight_curve,
    recommendation_lists,
)
from fedrec.features import build_item_features
from fedrec.federated import content_choice, copurchase_choice
from fedrec.federated.content_choice import ContentMatch
from fedrec.federated.copurchase_choice import CoPurchase
from fedrec.federated.local import LocalConfig
from fedrec.federated.simulation import TrainResult, run_federated
from fedrec.metrics import (
    METRICS,
    basket_label_share,
    catalogue_coverage,
    cosine,
    same_label_rate,
    same_label_rate_rows,
    seed_std,
    top1_share,
    unit_rows,
)
from fedrec.model import item_embeddings
from fedrec.served_weight import ServedWeight, served_biases
from fedrec.serving.foldin import FoldInConfig, fold_in_ials, fold_in_many
from fedrec.threads import use_threads
from fedrec.training.cold_start import evaluate_cold_start
from fedrec.training.data import left_out_line, load_dataset
from fedrec.training.progress import RoundPrinter
from fedrec.training.train import trained_with

METHODS = ("federated", "centralized", "local_only", "popularity", "implicit_als", "ease", "item_knn")
TRAINED = ("federated", "centralized", "local_only", "implicit_als")
REFERENCES = ("implicit_als", "popularity", "ease", "item_knn")  # `--only-references` reruns these
# Above this many products the similar-items rates are computed a block of rows at a time, and EASE
# and item-kNN, whose item-item matrices are items x items (EASE inverts one in float64), are skipped
# with the reason in their entries: at 16,000 products one such matrix is 2 GB, at 62,572 31 GB.
# Their user rows are the purchase matrix made dense, so they are skipped as well where customers x
# products passes the same count.
DENSE_SIMILARITY_MAX_ITEMS = 16_000
ITEM_ITEM_MAX_ITEMS = 16_000


def _split_rows(dataset: FederatedDataset, vecs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Pooled user rows back to merchants (pooled() stacks merchants in order)."""
    bounds = np.cumsum([0] + [m.n_users for m in dataset.merchants])
    return {m.name: vecs[bounds[i] : bounds[i + 1]] for i, m in enumerate(dataset.merchants)}


def _split_bias(dataset: FederatedDataset, bias: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The pooled client's per-merchant item bias rows back to their merchants."""
    return {m.name: None if bias is None else bias[i] for i, m in enumerate(dataset.merchants)}


def _central_served(
    dataset: FederatedDataset, features, cfg: RunConfig, res: TrainResult
) -> dict[str, ServedWeight] | None:
    """The centralized model's served weights, chosen as federated chooses them: per merchant, on
    its validation slice, with the early-stopped model (its pooled rows split back by merchant)."""
    trained = trained_with(cfg, res)
    if not served_weight.applies(trained.model, dataset.n_items, trained.local.full_softmax_max_items, False):
        return None
    first = res.early_stopped or res
    return served_weight.choose_all(
        dataset.merchants, _split_rows(dataset, first.user_embeddings["pooled"]),
        item_embeddings(first.item_state, features, trained.model), _split_bias(dataset, first.item_biases["pooled"]),
        trained.model.served_popularity_weights, trained.model.max_top1_share,
    ) or None  # fmt: skip


def _neural(dataset, features, cfg, fed_cfg, console, label) -> TrainResult:
    printer = RoundPrinter(console, label, len(dataset.merchants))
    return run_federated(dataset, features, cfg.model, cfg.local, fed_cfg, on_round=printer)


def summarise(entries: list[dict], seeds: list[int]) -> dict:
    """Mean over seeds of every metric (overall and per merchant), with recall@20's spread."""
    first = entries[0]
    recalls = [e["overall"]["recall@20"] for e in entries]
    out = {
        "overall": {m: float(np.mean([e["overall"][m] for e in entries])) for m in first["overall"]},
        "users": first["users"],
        "per_merchant": {
            name: {
                **{m: float(np.mean([e["per_merchant"][name][m] for e in entries])) for m in METRICS},
                "users": stats["users"],
            }
            for name, stats in first["per_merchant"].items()
        },
        "recall@20_std": seed_std(recalls),
        "recall@20_per_seed": [round(r, 4) for r in recalls],
        "seeds": list(seeds),
    }
    if "choice" in first:  # local.candidates: each seed's choice
        out["choice_per_seed"] = [e["choice"] for e in entries]
        out["temperature_per_seed"] = [e["temperature"] for e in entries]
    if "content_match" in first:  # each seed's content match, chosen on validation
        out["content_match_per_seed"] = [e.get("content_match") for e in entries]
    if "copurchase" in first:  # each seed's co-purchase term, chosen on validation
        out["copurchase_per_seed"] = [e.get("copurchase") for e in entries]
    if "choice_per_merchant" in first:  # local-only: each merchant's own choice, per seed
        out["choice_per_merchant_per_seed"] = [e["choice_per_merchant"] for e in entries]
    if "served_weights" in first:  # each merchant's served popularity weight, per seed
        out["served_weights_per_seed"] = [e["served_weights"] for e in entries]
        trained = [e["trained_score"] for e in entries]
        out["trained_score"] = {
            "recall@20": float(np.mean([t["recall@20"] for t in trained])),
            "recall@20_std": seed_std([t["recall@20"] for t in trained]),
            "top1_share": float(np.mean([t["top1_share"] for t in trained])),
        }
    for key in ("seconds", "rounds", "best_round", "refit_rounds"):
        if key in first:
            out[key] = round(float(np.mean([e[key] for e in entries])), 2)
    if "diversity" in first:
        out["diversity"] = {k: float(np.mean([e["diversity"][k] for e in entries])) for k in first["diversity"]}
    if "popularity_weight" in first:  # mean over seeds of each split's curve
        out["popularity_weight"] = {
            split: {
                w: {k: float(np.mean([e["popularity_weight"][split][w][k] for e in entries])) for k in row}
                for w, row in curve.items()
            }
            for split, curve in first["popularity_weight"].items()
        }
    return out


def item_labels(items: pl.DataFrame) -> np.ndarray:
    """[items, labels] 0/1: the product category where the catalogue has one, else the genres."""
    if "category" in items.columns and items["category"].null_count() < items.height:
        values = [[c] if c else [] for c in items["category"].to_list()]
    elif "genres" in items.columns:
        values = [g.split("|") if g else [] for g in items["genres"].to_list()]
    else:
        return np.zeros((items.height, 0))
    names = sorted({v for row in values for v in row})
    col = {n: i for i, n in enumerate(names)}
    out = np.zeros((items.height, len(names)))
    rows = np.repeat(np.arange(items.height), [len(r) for r in values])
    out[rows, [col[v] for r in values for v in r]] = 1.0
    return out


BASKET_SIZE = 5


def one_label_baskets(labels: np.ndarray, counts: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """One basket per label: its BASKET_SIZE most bought products that carry that label alone
    (five perfumes, five helmets). Labels with fewer such products, or where fewer than two
    baskets' worth carry it at all, are left out. Returns (baskets, label of each)."""
    alone = labels.sum(axis=1) == 1
    baskets, which = [], []
    for j in range(labels.shape[1]):
        pure = np.flatnonzero(alone & (labels[:, j] > 0))
        if len(pure) < BASKET_SIZE or labels[:, j].sum() < 2 * BASKET_SIZE:
            continue
        baskets.append(pure[np.argsort(-counts[pure], kind="stable")[:BASKET_SIZE]])
        which.append(j)
    return baskets, np.array(which, dtype=np.int64)


def diversity(dataset, users, items, biases, labels: np.ndarray, similar=None, basket=None) -> dict:
    """How concentrated the top-10 lists are, how category-coherent "similar items" are, and how
    much of a one-category basket's top-10 stays in that category.

    similar: None ranks neighbours by the item vectors (inner product, as the API does, and cosine);
    an array gives a method's own item-item scores (EASE); False skips it (popularity).
    basket: (baskets, their labels, a function from baskets to [baskets, items] scores), or None.
    """
    lists = recommendation_lists(dataset.merchants, users, items, biases, 10)
    out = {"coverage@10": catalogue_coverage(lists, dataset.n_items), "top1_share": top1_share(lists)}
    if similar is False or labels.shape[1] == 0:
        return out
    vecs = items.numpy() if similar is None else similar
    if vecs.shape[0] <= DENSE_SIMILARITY_MAX_ITEMS:  # the whole items x items matrix at once
        out["similar_same_label@10_ip"] = same_label_rate(vecs @ vecs.T if similar is None else vecs, labels)
        out["similar_same_label@10_cosine"] = same_label_rate(cosine(vecs), labels)
    else:  # the same numbers, a block of rows at a time
        unit = unit_rows(vecs)
        own = (lambda rows: vecs[rows] @ vecs.T) if similar is None else (lambda rows: vecs[rows])
        out["similar_same_label@10_ip"] = same_label_rate_rows(own, len(vecs), labels)
        out["similar_same_label@10_cosine"] = same_label_rate_rows(lambda rows: unit[rows] @ unit.T, len(vecs), labels)
    if basket is not None and len(basket[0]):
        baskets, which, score = basket
        out["basket_same_label@10"] = basket_label_share(score(baskets), baskets, which, labels)
    return out


def tower_basket_scores(
    items: torch.Tensor, local: LocalConfig, match: ContentMatch | None = None, copurchase: CoPurchase | None = None
) -> Callable[[list[np.ndarray]], np.ndarray]:
    """An anonymous basket as the API answers it: the training loss's fold-in (the softmax one at
    the default reg, or ALS's user step for an ials model, as `serving.recommend.basket_vectors`)
    against the tower's part of the vectors, the basket's content profile after it where the model
    has the content match (and its purchase row with the co-purchase term), then the dot product."""
    vecs, reg = items.numpy(), FoldInConfig().reg
    weight, width = content_choice.block(match)
    term = copurchase_choice.block(copurchase)

    def fold(tower: np.ndarray, baskets: list[np.ndarray]) -> np.ndarray:
        if local.loss == "ials":
            return fold_in_ials(tower, baskets, local.ials_alpha, local.user_solve_reg, reg)
        return fold_in_many(tower, baskets, "softmax", reg, local.temperature)

    return lambda baskets: fold_in_with_match(lambda t: fold(t, baskets), vecs, baskets, weight, width, term) @ vecs.T


def choose_ease_lambda(dataset: FederatedDataset, lambdas=EASE_LAMBDAS) -> tuple[float, dict[str, float]]:
    """EASE's lambda by validation recall@20: fit on train minus the validation slice, rank with
    train purchases excluded, score the validation slice (test is never looked at)."""
    pool = pooled(dataset)
    scores = {}
    for lam in lambdas:
        u, v = ease(pool.train, lam)
        scores[str(lam)] = merchant_metric_sums(u, v, pool.train, pool.val, ("recall@20",)).means()["recall@20"]
    best = max(lambdas, key=lambda lam: scores[str(lam)])
    return best, scores


def choose_knn_settings(dataset: FederatedDataset, grid: dict[str, tuple] = KNN_GRID) -> tuple[dict, dict[str, float]]:
    """Item-kNN's similarity and neighbour count by validation recall@20, fitted and ranked as
    `choose_ease_lambda` does (deterministic: no seeds)."""
    pool = pooled(dataset)
    scores: dict[str, float] = {}
    best: tuple[float, dict] = (-1.0, {})
    for similarity, neighbours in itertools.product(grid["similarity"], grid["neighbours"]):
        settings = {"similarity": similarity, "neighbours": int(neighbours)}
        u, v, _ = item_knn(pool.train, **settings)
        key = f"{similarity},neighbours={neighbours}"
        scores[key] = merchant_metric_sums(u, v, pool.train, pool.val, ("recall@20",)).means()["recall@20"]
        if scores[key] > best[0]:  # ties keep the earlier setting
            best = (scores[key], settings)
    return best[1], scores


def choose_als_settings(
    dataset: FederatedDataset, seeds: tuple[int, ...], grid: dict[str, tuple[float, ...]] = ALS_GRID
) -> tuple[dict, dict[str, float]]:
    """implicit ALS's factors, regularization and alpha by validation recall@20 (the mean over the
    seeds' fits), fitted and ranked as `choose_ease_lambda` does: ALS gets its own choice on the
    same slice, as EASE's lambda and the tower's temperature do, and test is never looked at."""
    pool = pooled(dataset)
    scores: dict[str, float] = {}
    best: tuple[float, dict] = (-1.0, {})
    for factors, reg, alpha in itertools.product(grid["factors"], grid["regularization"], grid["alpha"]):
        settings = {"factors": int(factors), "regularization": float(reg), "alpha": float(alpha)}
        fits = [implicit_als(pool.train, **settings, seed=seed) for seed in seeds]
        val = [merchant_metric_sums(u, v, pool.train, pool.val, ("recall@20",)).means()["recall@20"] for u, v in fits]
        key = ",".join(f"{k}={v:g}" for k, v in settings.items())
        scores[key] = float(np.mean(val))
        if scores[key] > best[0]:  # ties keep the earlier (smaller) setting
            best = (scores[key], settings)
    return best[1], scores


Scorer = Callable[..., dict]


def make_scorer(dataset: FederatedDataset, cfg: RunConfig) -> Scorer:
    """What every method is scored by: test metrics of the same customers, and the same top-10
    lists, similar items and one-category baskets (`diversity`)."""
    full = pooled(dataset).full_train
    labels = item_labels(dataset.items)
    baskets, basket_labels = one_label_baskets(labels, np.asarray(full.sum(axis=0)).ravel())

    def scored(
        users,
        items,
        seconds: float,
        result: TrainResult | None = None,
        biases=None,
        similar=None,
        basket=None,
        served: dict[str, ServedWeight] | None = None,
    ) -> dict:
        """`served`: each merchant's served popularity weight; the scores are then the API's
        defaults (u . v + w b), and `trained_score` holds recall@20 and top-1 share at w = 1."""
        ranked = served_biases(biases, served) if served and biases else biases
        entry = evaluate_test_all(dataset.merchants, users, items, ranked)
        entry["seconds"] = round(seconds, 2)
        if basket is None and similar is None:  # a two-tower model: baskets folded in as the API does
            local = trained_with(cfg, result).local if result is not None else cfg.local
            basket = tower_basket_scores(
                items, local, *((None, None) if result is None else (result.content_match, result.copurchase))
            )
        basket_args = None if basket is None else (baskets, basket_labels, basket)
        entry["diversity"] = diversity(dataset, users, items, ranked, labels, similar, basket_args)
        if ranked is not biases:
            entry["served_weights"] = {name: w.weight for name, w in served.items()}
            entry["trained_score"] = {
                "recall@20": evaluate_test_all(dataset.merchants, users, items, biases)["overall"]["recall@20"],
                "top1_share": top1_share(recommendation_lists(dataset.merchants, users, items, biases)),
            }
        if result is not None:
            if result.choice is not None:  # local.candidates: what validation chose
                entry["choice"] = result.choice.label
                entry["temperature"] = result.choice.local.temperature
                entry["choice_scores"] = result.choice.scores
            if result.content_match is not None:  # its weight, chosen on validation after training
                entry["content_match"] = result.content_match.entry()
            if result.copurchase is not None:  # its lam and weight, chosen on validation after training
                entry["copurchase"] = result.copurchase.entry()
            entry["rounds"] = len(result.history)
            entry["best_round"] = result.best_round
            entry["refit_rounds"] = result.refit_rounds
        return entry

    return scored


def item_item_skipped(dataset: FederatedDataset) -> str | None:
    """Why EASE and item-kNN are not run on this dataset (their matrices would not fit), else None."""
    customers = sum(m.n_users for m in dataset.merchants)
    if dataset.n_items <= ITEM_ITEM_MAX_ITEMS and customers * dataset.n_items <= ITEM_ITEM_MAX_ITEMS**2:
        return None
    return (
        f"skipped: {dataset.n_items} products and {customers} customers; EASE and item-kNN hold items x "
        f"items and customers x items matrices, at most {ITEM_ITEM_MAX_ITEMS} products and "
        f"{ITEM_ITEM_MAX_ITEMS**2:,} customer-product pairs here"
    )


def _summed_rows(matrix: np.ndarray) -> Callable[[list[np.ndarray]], np.ndarray]:
    """An item-item model's anonymous-basket scores: the sum of the basket's rows (X B, X S)."""
    return lambda baskets: np.stack([matrix[rows].sum(0) for rows in baskets])


def item_item_references(dataset: FederatedDataset, full: sp.csr_matrix, scored: Scorer) -> dict[str, dict]:
    """EASE (lambda chosen on validation) and implicit's item-kNN (similarity and neighbours chosen on
    validation), each fitted on `full`; their "similar items" of i are row i of their item-item matrix."""
    out: dict[str, dict] = {}
    t0 = time.perf_counter()
    lam, val_scores = choose_ease_lambda(dataset)
    u, v = ease(full, lam)
    weights = v.numpy().T  # B: row i holds the items i's purchase predicts most
    out["ease"] = scored(
        _split_rows(dataset, u), v, time.perf_counter() - t0, similar=weights, basket=_summed_rows(weights)
    )
    out["ease"]["settings"] = {"lambda": lam, "chosen_on": "validation recall@20", "validation": val_scores}
    t0 = time.perf_counter()
    knn, knn_scores = choose_knn_settings(dataset)
    u, v, sim = item_knn(full, **knn)
    out["item_knn"] = scored(
        _split_rows(dataset, u), v, time.perf_counter() - t0, similar=sim, basket=_summed_rows(sim)
    )
    out["item_knn"]["settings"] = {**knn, "chosen_on": "validation recall@20", "validation": knn_scores}
    return out


def references(dataset: FederatedDataset, seeds: tuple[int, ...], scored: Scorer, console: Console) -> dict[str, dict]:
    """The centralized references, each on everything before the test cut-off: implicit's ALS
    (settings chosen on validation, then one seeded fit per seed), popularity, EASE (lambda
    chosen on validation) and implicit's item-kNN (similarity and neighbours chosen on validation)."""
    full = pooled(dataset).full_train
    out: dict[str, dict] = {}
    settings, als_scores = choose_als_settings(dataset, seeds)
    entries = []
    for seed in seeds:
        t0 = time.perf_counter()
        u, v = implicit_als(full, **settings, seed=seed)
        basket = lambda b, v=v.numpy(): als_fold_in(v, b, settings["alpha"], settings["regularization"]) @ v.T  # noqa: E731
        entries.append(scored(_split_rows(dataset, u), v, time.perf_counter() - t0, basket=basket))
        console.print(f"[bold]implicit_als[/] (seed {seed}): recall@20 {entries[-1]['overall']['recall@20']:.4f}")
    out["implicit_als"] = summarise(entries, list(seeds))
    out["implicit_als"]["settings"] = {
        **settings,
        "iterations": 15,
        "chosen_on": "validation recall@20, mean over the seeds",
        "validation": als_scores,
    }
    t0 = time.perf_counter()
    u, v = popularity(full)
    out["popularity"] = scored(_split_rows(dataset, u), v, time.perf_counter() - t0, similar=False)
    why = item_item_skipped(dataset)
    if why is None:
        out.update(item_item_references(dataset, full, scored))
    else:
        out["ease"], out["item_knn"] = {"skipped": why}, {"skipped": why}
    for name in ("popularity", "ease", "item_knn"):
        entry = out[name]
        result = entry["skipped"] if "skipped" in entry else f"recall@20 {entry['overall']['recall@20']:.4f}"
        console.print(f"[bold]{name}[/]: {result}")
    return out


def evaluate(
    cfg: RunConfig,
    console: Console | None = None,
    quiet_rounds: bool = False,
    seeds: tuple[int, ...] = (0, 1, 2),
    ablations: bool = True,
) -> dict:
    """Every trained method once per seed (federation.seed = seed), reported as mean and spread.

    `ablations=False` skips the variants that each flip one design choice (they train the
    federated model three more times); the refit's own ablation costs nothing and stays."""
    console = console or Console()
    if cfg.privacy.enabled:  # every method here is non-private; DP runs have their own report
        raise FedrecError("fedrec evaluate compares non-private methods: unset [privacy], or run fedrec privacy-report")
    use_threads(cfg.threads)
    dataset = load_dataset(cfg.data, cfg.federation.seed)
    if left_out := left_out_line(dataset.protocol):
        console.print(left_out)
    features = build_item_features(dataset.items, cfg.model.hash_buckets)
    seeds = tuple(seeds)
    out: dict = {
        "dataset": dataset.name,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": (
            f"make evaluate DATASET={dataset.name}" + ("" if ablations else " ABLATIONS=0")
            if cfg.data.dataset != "file"
            else f"fedrec evaluate --dataset file --set data.path={cfg.data.path}"
            + ("" if ablations else " --no-ablations")
        ),
        "data": dataset.summary(),
        "protocol": dataset.protocol,
        "metrics": list(METRICS),
        "seeds": list(seeds),
    }
    curves: dict[str, list[float]] = {}
    quiet = Console(quiet=True)
    show = quiet if quiet_rounds else console
    per_seed: dict[str, list[dict]] = {}
    scored = make_scorer(dataset, cfg)

    def keep(name: str, entry: dict, seed: int, result: TrainResult | None = None, curve: str | None = None) -> None:
        per_seed.setdefault(name, []).append(entry)
        if result is not None and seed == seeds[0]:  # the plot shows the first seed's curves
            curves[curve or name] = [h.val_recall_at_20 for h in result.history]
        console.print(f"[bold]{name}[/] (seed {seed}): recall@20 {entry['overall']['recall@20']:.4f}")

    for seed in seeds:
        run_cfg = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, seed=seed))
        fed_cfg = run_cfg.federation

        # Federated, with the configured aggregation rule.
        res = _neural(dataset, features, run_cfg, fed_cfg, show, f"federated, seed {seed}")
        model_cfg = trained_with(run_cfg, res).model
        items = item_embeddings(res.item_state, features, model_cfg)
        entry = scored(res.user_embeddings, items, res.seconds, res, res.item_biases, served=res.served_weights)
        first = res.early_stopped or res  # trained on train alone: what validation may judge
        first_items = items if first is res else item_embeddings(first.item_state, features, model_cfg)
        if any(b is not None for b in res.item_biases.values()):  # the served popularity_weight knob
            entry["popularity_weight"] = {
                "validation": popularity_weight_curve(
                    dataset.merchants, first.user_embeddings, first_items, first.item_biases, "val"
                ),
                "test": popularity_weight_curve(dataset.merchants, res.user_embeddings, items, res.item_biases),
            }
        keep("federated", entry, seed, res)
        if res.early_stopped is not None:  # the refit's own ablation: the model it replaced
            entry = scored(
                first.user_embeddings, first_items, first.seconds, first, first.item_biases, served=res.served_weights
            )  # fmt: skip
            keep("ablation refit=False", entry, seed)

        # Centralized: one client holding the pooled data; same model, loss and schedule.
        central = FederatedDataset(dataset.name, dataset.items, [pooled(dataset)], dataset.protocol)
        res = _neural(central, features, run_cfg, fed_cfg, show, f"centralized, seed {seed}")
        entry = scored(
            _split_rows(dataset, res.user_embeddings["pooled"]),
            item_embeddings(res.item_state, features, trained_with(run_cfg, res).model),
            res.seconds,
            res,
            _split_bias(dataset, res.item_biases["pooled"]),  # per merchant, as federated: the same model
            served=_central_served(dataset, features, run_cfg, res),
        )
        keep("centralized", entry, seed, res)

        # Local-only: every merchant trains the same model on its own customers alone.
        parts: dict[str, MetricSums] = {}
        lists, chosen = [], {}
        t0, rounds = time.perf_counter(), 0
        for m in dataset.merchants:
            alone = FederatedDataset(dataset.name, dataset.items, [m], dataset.protocol)
            res = run_federated(alone, features, cfg.model, cfg.local, fed_cfg)
            rounds = max(rounds, len(res.history))
            if res.choice is not None:  # each merchant alone chooses on its own validation slice
                chosen[m.name] = res.choice.label
            own = item_embeddings(res.item_state, features, trained_with(run_cfg, res).model)
            biases = served_biases(res.item_biases, res.served_weights)  # its own served weight
            parts[m.name] = evaluate_test(m, res.user_embeddings[m.name], own, biases[m.name])
            lists.append(recommendation_lists([m], res.user_embeddings, own, biases))
        entry = combine(parts)
        entry.update(seconds=round(time.perf_counter() - t0, 2), rounds=rounds)
        if chosen:
            entry["choice_per_merchant"] = chosen
        # each shop has its own item vectors, so "similar items" has no single answer here
        lists = np.vstack(lists)
        entry["diversity"] = {
            "coverage@10": catalogue_coverage(lists, dataset.n_items),
            "top1_share": top1_share(lists),
        }
        keep("local_only", entry, seed)

        # Ablations: each design choice of the federated run flipped alone.
        for label, (model_cfg, variant_fed) in (_variants(run_cfg) if ablations else {}).items():
            variant = dataclasses.replace(run_cfg, model=model_cfg, federation=variant_fed)
            res = _neural(dataset, features, variant, variant_fed, show, f"federated ({label}), seed {seed}")
            items = item_embeddings(res.item_state, features, trained_with(variant, res).model)
            entry = scored(res.user_embeddings, items, res.seconds, res, res.item_biases, served=res.served_weights)
            keep(f"ablation {label}", entry, seed, res, curve=f"federated ({label})")

    for name in ("federated", "centralized", "local_only"):
        out[name] = summarise(per_seed[name], list(seeds))
    out["ablations"] = {
        name.removeprefix("ablation "): summarise(entries, list(seeds))
        for name, entries in per_seed.items()
        if name.startswith("ablation ")
    }

    out.update(references(dataset, seeds, scored, console))

    # New products: trained without them, embedded from their content (training/cold_start.py).
    out["cold_start"] = evaluate_cold_start(cfg, dataset, seeds, console)

    fed, cen = out["federated"], out["centralized"]
    local = out["local_only"]
    gap = fed["overall"]["recall@20"] - cen["overall"]["recall@20"]
    spread = max(fed["recall@20_std"], cen["recall@20_std"])
    out["checks"] = {
        "federated_over_centralized_recall@20": round(fed["overall"]["recall@20"] / cen["overall"]["recall@20"], 4),
        "federated_minus_centralized_recall@20": round(gap, 4),
        "gap_exceeds_seed_spread": abs(gap) > spread,
        "federated_beats_local_only_for": sorted(
            n
            for n in fed["per_merchant"]
            if fed["per_merchant"][n]["recall@20"] > local["per_merchant"][n]["recall@20"]
        ),
        "federated_beats_local_only_overall": fed["overall"]["recall@20"] > local["overall"]["recall@20"],
    }
    out["config"] = cfg.to_dict()
    out["curves"] = curves
    return out


def _variants(cfg: RunConfig) -> dict:
    other = "rowwise" if cfg.federation.aggregation == "fedavg" else "fedavg"
    return {
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


def _cell(entry: dict, metric: str) -> str:
    value = f"{entry['overall'][metric]:.4f}"
    if metric == "recall@20" and "recall@20_std" in entry:
        value += f" ± {entry['recall@20_std']:.4f}"
    return value


def markdown_table(res: dict) -> str:
    # a results file from before a reference was added lacks it; a large catalogue skips EASE and item-kNN
    shown = [m for m in METHODS if "overall" in res.get(m, {})]
    head = "| method | " + " | ".join(METRICS) + " | seconds |\n|---|" + "---:|" * (len(METRICS) + 1) + "\n"
    rows = [f"| {m} | " + " | ".join(_cell(res[m], k) for k in METRICS) + f" | {res[m]['seconds']} |" for m in shown]
    merchants = list(res["federated"]["per_merchant"])
    pm = (
        "\n\nrecall@20 per merchant (users), mean over seeds:\n\n| method | "
        + " | ".join(f"{n} ({res['federated']['per_merchant'][n]['users']})" for n in merchants)
        + " |\n|---|"
        + "---:|" * len(merchants)
        + "\n"
    )
    pm += "\n".join(
        f"| {m} | " + " | ".join(f"{res[m]['per_merchant'][n]['recall@20']:.4f}" for n in merchants) + " |"
        for m in shown
    )
    checks = res["checks"]
    seeds = ", ".join(str(s) for s in res["seeds"])
    als = res["implicit_als"].get("settings", {})
    als_chosen = (
        f"implicit ALS: {als['factors']} factors, regularization {als['regularization']:g}, alpha {als['alpha']:g}, "
        f"chosen on validation.\n"
        if "chosen_on" in als
        else ""
    )
    foot = (
        f"\n\nTrained methods: mean ± standard deviation of recall@20 over seeds {seeds}; popularity, EASE "
        f"({_ease_lambda(res)}) and item-kNN are deterministic.\n"
        + als_chosen
        + _knn_chosen(res)
        + f"federated - centralized recall@20: {checks['federated_minus_centralized_recall@20']:+.4f} "
        f"({'more' if checks['gap_exceeds_seed_spread'] else 'less'} than the seed spread); "
        f"federated beats local-only for {len(checks['federated_beats_local_only_for'])}/{len(merchants)} merchants.\n"
    )
    chosen = [
        f"{m} {' | '.join(res[m]['choice_per_seed'])}"
        for m in ("federated", "centralized") if "choice_per_seed" in res[m]
    ]  # fmt: skip
    if chosen:
        foot += f"Settings chosen on validation (local.candidates), per seed: {'; '.join(chosen)}.\n"
    abl = "".join(
        f"Ablation {k}: recall@20 {v['overall']['recall@20']:.4f} ± {v['recall@20_std']:.4f}.\n"
        for k, v in res["ablations"].items()
    )
    keys = (
        "coverage@10", "top1_share", "similar_same_label@10_ip", "similar_same_label@10_cosine", "basket_same_label@10",
    )  # fmt: skip
    div = (
        "\nBeyond accuracy (top-10 lists of every test customer; similar items: the 10 nearest items, "
        "sharing a category or genre; one-category basket: for each category (genre), its 5 most bought "
        "products of that category alone as an anonymous basket, the share of its top-10 in that category):"
        "\n\n| method | catalogue coverage@10 | top-1 share | similar items same label (inner product) | "
        "similar items same label (cosine) | one-category basket: top-10 in category |\n"
        "|---|---:|---:|---:|---:|---:|\n"
        + "\n".join(
            f"| {m} | " + " | ".join(_num(res[m].get("diversity", {}).get(k)) for k in keys) + " |" for m in shown
        )
        + "\n"
    )
    return (
        f"# Evaluation: {res['dataset']}\n\n"
        + head
        + "\n".join(rows)
        + pm
        + foot
        + abl
        + div
        + _served_table(res)
        + _popularity_table(res)
        + _cold_table(res)
    )


def _ease_lambda(res: dict) -> str:
    ease = res.get("ease", {})
    return ease["skipped"] if "skipped" in ease else f"lambda {ease['settings']['lambda']:g}, chosen on validation"


def _knn_chosen(res: dict) -> str:
    knn = res.get("item_knn", {}).get("settings")
    if not knn:  # a results file from before the item-kNN reference
        return ""
    return f"item-kNN: {knn['similarity']} similarity, {knn['neighbours']} neighbours, chosen on validation.\n"


def _popularity_table(res: dict) -> str:
    curve = res["federated"].get("popularity_weight")
    if not curve:
        return ""
    rows = "".join(
        f"| {w} | {curve['validation'][w]['recall@20']:.4f} | {curve['validation'][w]['top1_share']:.4f} | "
        f"{curve['test'][w]['recall@20']:.4f} | {curve['test'][w]['top1_share']:.4f} | "
        f"{curve['test'][w]['coverage@10']:.4f} |\n"
        for w in curve["test"]
    )
    return (
        "\nFederated, the merchant item bias scaled by the served `popularity_weight` w (u . v + w b; mean over "
        "seeds; validation: the model trained on train alone):\n\n"
        "| w | validation recall@20 | validation top-1 share | test recall@20 | test top-1 share | "
        "test coverage@10 |\n|---:|---:|---:|---:|---:|---:|\n" + rows
    )


def _served_table(res: dict) -> str:
    """The trained methods at their served popularity weights against the trained score (w = 1)."""
    names = [m for m in ("federated", "centralized") if "trained_score" in res.get(m, {})]
    if not names:
        return ""
    rows = "".join(
        f"| {m} | {res[m]['overall']['recall@20']:.4f} ± {res[m]['recall@20_std']:.4f} | "
        f"{res[m]['diversity']['top1_share']:.4f} | {res[m]['trained_score']['recall@20']:.4f} ± "
        f"{res[m]['trained_score']['recall@20_std']:.4f} | {res[m]['trained_score']['top1_share']:.4f} | "
        + "; ".join(", ".join(f"{n} {w:g}" for n, w in seed.items()) for seed in res[m]["served_weights_per_seed"])
        + " |\n"
        for m in names
    )
    return (
        "\nServed popularity weights (each merchant's w chosen on its validation slice, top-1 share at most "
        "`model.max_top1_share`; the rows above use them) against the trained score, w = 1:\n\n"
        "| method | recall@20 served | top-1 share served | recall@20 at w = 1 | top-1 share at w = 1 | "
        "weights per seed |\n|---|---:|---:|---:|---:|---|\n" + rows
    )


def _cold_table(res: dict) -> str:
    cold = res.get("cold_start", {})
    if "federated" not in cold:
        return ""
    rows = "".join(
        f"| {name} ({cold[name]['new_product_vectors']}) | {cold[name]['recall@20']:.4f} ± "
        f"{cold[name]['recall@20_std']:.4f} |\n"
        for name in ("federated", "federated_content_tower")
        if name in cold
    )
    return (
        f"\nCold start: {cold['new_products']} new products ({cold['definition']}), {cold['their_test_purchases']} "
        f"test purchases by {cold['customers']} customers; recall@20 ranking the new products only "
        f"(random: {cold['random_expectation']:.4f}), trained without them.\n\n| method | recall@20 on new products |\n"
        f"|---|---:|\n{rows}"
        f"| content only (TF-IDF profile) | {cold['content_only']['recall@20']:.4f} |\n"
        f"| new-product popularity (other customers, test period) | "
        f"{cold['new_product_popularity']['recall@20']:.4f} |\n"
    )


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def plot_curves(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in res["curves"].items():
        ax.plot(range(1, len(ys) + 1), ys, label=name)
    for name, colour in (("popularity", "grey"), ("implicit_als", "black"), ("ease", "brown"), ("item_knn", "teal")):
        if "overall" not in res.get(name, {}):
            continue
        ax.axhline(res[name]["overall"]["recall@20"], ls="--", lw=1, label=f"{name} (test)", color=colour)
    ax.set_xlabel("round (centralized: epochs of the pooled data)")
    ax.set_ylabel("recall@20")
    ax.set_title(f"{res['dataset']}: validation recall@20 per round (seed {res['seeds'][0]})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def rerun_cold_start(cfg: RunConfig, console: Console, seeds: tuple[int, ...]) -> dict[str, Path]:
    """Only the cold-start section, written into the dataset's existing results file (every other
    section kept as its run left it); the section names its own command and date."""
    use_threads(cfg.threads)
    dataset = load_dataset(cfg.data, cfg.federation.seed)
    res = _existing_results(cfg, dataset)
    res["cold_start"] = evaluate_cold_start(cfg, dataset, seeds, console) | {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": _command(cfg, dataset.name, "ONLY=cold-start", "--only-cold-start"),
    }
    return write_results(res, Path(cfg.output.results_dir))


def rerun_references(cfg: RunConfig, console: Console, seeds: tuple[int, ...]) -> dict[str, Path]:
    """Only the centralized references (`REFERENCES`), written into the dataset's existing results
    file, every other section kept as its run left it; `references_rerun` names the command and date."""
    use_threads(cfg.threads)
    dataset = load_dataset(cfg.data, cfg.federation.seed)
    res = _existing_results(cfg, dataset)
    res.update(references(dataset, seeds, make_scorer(dataset, cfg), console))
    res["references_rerun"] = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": _command(cfg, dataset.name, "ONLY=references", "--only-references"),
        "methods": list(REFERENCES),
    }
    return write_results(res, Path(cfg.output.results_dir))


def _existing_results(cfg: RunConfig, dataset: FederatedDataset) -> dict:
    path = Path(cfg.output.results_dir) / f"evaluation-{dataset.name}.json"
    if not path.is_file():
        raise FedrecError(f"{path}: no results file to update; run fedrec evaluate first")
    return json.loads(path.read_text())


def _command(cfg: RunConfig, name: str, make_arg: str, cli_flag: str) -> str:
    if cfg.data.dataset != "file":
        return f"make evaluate DATASET={name} {make_arg}"
    return f"fedrec evaluate --dataset file --set data.path={cfg.data.path} {cli_flag}"


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
