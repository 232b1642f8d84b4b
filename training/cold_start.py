"""Cold start: can the federated model recommend products nobody had bought when it was trained?

The new products are those first sold after every buyer's cut-off (`cold_start_split`): all their
purchases are in test. The model trains without them (they are not in its catalogue), then embeds
them from their content, as the export does (`catalogue_embeddings`); a model without a content
tower is also run with it on, to show what the tower adds. Each test customer who bought a new product
gets the new products ranked, and recall@20 counts how many of their new purchases are in the top
20. Two references: a content-only recommender (TF-IDF token profile of what the customer bought,
no learning) and the popularity of each new product among the *other* customers' test purchases,
which uses test-period sales no real system has at launch.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import sys
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp
import torch
from rich.console import Console

from fedrec.atomic import write_json
from fedrec.baselines import content_profile_scores
from fedrec.config import RunConfig
from fedrec.data import FederatedDataset
from fedrec.datasets.protocol import cold_start_split
from fedrec.errors import FedrecError
from fedrec.features import build_item_features
from fedrec.federated.simulation import TrainResult, run_federated
from fedrec.metrics import per_user_metrics, seed_std
from fedrec.model import ModelConfig, catalogue_embeddings
from fedrec.threads import use_threads
from fedrec.training.compare_on_validation import summarise
from fedrec.training.data import load_dataset
from fedrec.training.train import trained_with

K = 20


def recall_of_scores(scores: np.ndarray, truth: sp.csr_matrix) -> tuple[float, int]:
    """Mean recall@K over customers with at least one truth item, ranking every column of scores."""
    keep = np.flatnonzero(truth.getnnz(axis=1) > 0)
    if keep.size == 0:
        return float("nan"), 0
    k = min(K, scores.shape[1])
    topk = np.argsort(-scores[keep], axis=1, kind="stable")[:, :k]
    recall = per_user_metrics(topk, truth[keep], (K,))[f"recall@{K}"]
    return float(np.mean(recall)), int(keep.size)


NEIGHBOUR_CANDIDATES = (0, 300, 100, 30, 10)


def choose_neighbours_on_validation(
    cfg: RunConfig, dataset: FederatedDataset, seeds: tuple[int, ...], console: Console,
    candidates: tuple[int, ...] = NEIGHBOUR_CANDIDATES,
) -> dict:  # fmt: skip
    """`model.new_item_neighbours` scored on the validation slice's new products (test unread).

    The products first sold in the validation slice leave the catalogue; the model trains on the
    rest of train (early stopping on the known products' validation purchases, no refit), and each
    customer who bought a new product in validation gets the new products ranked by every candidate
    neighbour count. One training run per seed scores all candidates.
    """
    known, new = cold_start_split(dataset, period="validation")
    out: dict = {"new_products": int(new.size), "candidates": list(candidates)}
    if new.size == 0 or cfg.model.use_content:  # the content tower embeds new products itself
        return out
    truth = sp.vstack([m.val[:, new] for m in dataset.merchants]).tocsr()
    features = _known_first(dataset, known, new, cfg)
    n_known = known.n_items
    train_features = dataclasses.replace(features, tokens=features.tokens[:n_known])
    scores: dict[int, list[float]] = {k: [] for k in candidates}
    for seed in seeds:
        fed = dataclasses.replace(cfg.federation, seed=seed, refit=False)
        res = run_federated(known, train_features, cfg.model, cfg.local, fed)
        used = trained_with(cfg, res).model
        users = torch.cat([res.user_embeddings[m.name] for m in known.merchants])
        for k in candidates:  # the export's path, with each neighbour count
            vecs = catalogue_embeddings(res.item_state, features, dataclasses.replace(used, new_item_neighbours=k),
                                        n_known)[n_known:]  # fmt: skip
            scores[k].append(recall_of_scores((users @ vecs.T).numpy(), truth)[0])
        shown = ", ".join(f"{k}: {scores[k][-1]:.4f}" for k in candidates)
        console.print(f"[bold]cold start on validation[/] (seed {seed}), recall@20 by neighbours: {shown}")
    summary = summarise({str(k): v for k, v in scores.items()})  # `clear`: the lead exceeds both spreads
    stats = {k: {**v, "per_seed": scores[int(k)]} for k, v in summary.pop("stats").items()}
    out.update(
        customers=int((truth.getnnz(axis=1) > 0).sum()),
        recall_at_20=stats,
        **{k: int(v) if k in ("best", "runner_up") else v for k, v in summary.items()},
        seeds=list(seeds),
        configured=cfg.model.new_item_neighbours,
    )
    return out


def validate_cold_start(cfg: RunConfig, console: Console, seeds: tuple[int, ...]) -> tuple[dict, Path]:
    """`fedrec validate-cold-start`: `choose_neighbours_on_validation` on the configured dataset,
    written to results/validation-model.new_item_neighbours-<dataset>.json with its command."""
    if cfg.model.use_content:
        raise FedrecError("validate-cold-start: with model.use_content on, the content tower embeds new products")
    use_threads(cfg.threads)
    dataset = load_dataset(cfg.data, cfg.federation.seed)
    res = choose_neighbours_on_validation(cfg, dataset, seeds, console) | {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "fedrec " + " ".join(sys.argv[1:]),
    }
    path = Path(cfg.output.results_dir) / f"validation-model.new_item_neighbours-{dataset.name}.json"
    write_json(path, res)
    return res, path


def _known_first(dataset: FederatedDataset, known: FederatedDataset, new: np.ndarray, cfg: RunConfig):  # noqa: ANN202
    """Item features with the known products first (the trained rows) and the new ones after."""
    items = pl.concat([known.items, dataset.items[new.tolist()]])
    return build_item_features(items, cfg.model.hash_buckets)


def _new_product_vectors(model_cfg: ModelConfig, res: TrainResult) -> str:
    if model_cfg.use_content:
        how = "content tower alone"
    else:
        over = f"the {model_cfg.new_item_neighbours} most similar" if model_cfg.new_item_neighbours else "all"
        how = f"trained vectors averaged by TF-IDF content similarity, over {over} trained products"
    if res.content_match is not None and res.content_match.weight > 0:
        how += f", plus the content match (weight {res.content_match.weight:g})"
    return how


def evaluate_cold_start(cfg: RunConfig, dataset: FederatedDataset, seeds: tuple[int, ...], console: Console) -> dict:
    """Recall@20 on new products for the federated model (mean and spread over seeds) and references."""
    known, new = cold_start_split(dataset)
    truth = sp.vstack([m.test[:, new] for m in dataset.merchants]).tocsr()
    out: dict = {
        "new_products": int(new.size),
        "their_test_purchases": int(truth.nnz),
        "definition": "products whose every purchase is in the test period (first sold after each buyer's cut-off)",
        "ranking": f"each test customer's new-product purchases among the {new.size} new products",
    }
    if new.size == 0:
        return out
    features = _known_first(dataset, known, new, cfg)
    n_known = known.n_items
    train_features = dataclasses.replace(features, tokens=features.tokens[:n_known])
    variants = {"federated": cfg.model}
    if not cfg.model.use_content:  # what the content tower would have done, trained the same way
        variants["federated_content_tower"] = dataclasses.replace(cfg.model, use_content=True)
    for name, model_cfg in variants.items():
        recalls, how = [], []
        for seed in seeds:
            fed = dataclasses.replace(cfg.federation, seed=seed)
            res = run_federated(known, train_features, model_cfg, cfg.local, fed)
            used = trained_with(dataclasses.replace(cfg, model=model_cfg), res).model  # what validation chose
            vecs = catalogue_embeddings(res.item_state, features, used, n_known)[n_known:]
            users = torch.cat([res.user_embeddings[m.name] for m in known.merchants])
            recalls.append(recall_of_scores((users @ vecs.T).numpy(), truth)[0])
            how.append(_new_product_vectors(used, res))
            console.print(f"[bold]cold start, {name}[/] (seed {seed}): recall@20 on new products {recalls[-1]:.4f}")
        out[name] = {
            "recall@20": float(np.mean(recalls)),
            "recall@20_std": seed_std(recalls),
            "recall@20_per_seed": [round(r, 4) for r in recalls],
            "seeds": list(seeds),
            "new_product_vectors": "; or ".join(dict.fromkeys(how)),  # one per seed where the choices differ
        }
    bought = sp.vstack([m.full_train for m in known.merchants]).tocsr()
    content = content_profile_scores(bought, features.tokens, n_known, features.n_buckets)
    others = np.asarray(truth.sum(axis=0)).ravel()[None, :] - truth.toarray()  # leave the customer out
    recall_content, users_n = recall_of_scores(content, truth)
    out.update(
        customers=users_n,
        random_expectation=round(min(K, new.size) / new.size, 4),
        content_only={"recall@20": recall_content, "method": "TF-IDF token profile of past purchases, cosine"},
        new_product_popularity={
            "recall@20": recall_of_scores(others + 1e-9 * np.arange(new.size)[::-1], truth)[0],
            "method": "other customers' test-period purchases of each new product (not known at launch; a"
            " product bought once counts 0 for its one buyer, so this can fall below random)",
        },
    )
    return out
