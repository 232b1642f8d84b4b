"""`fedrec train`: federated training on the configured dataset, then a versioned export."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from fedrec.atomic import write_with
from fedrec.config import RunConfig
from fedrec.data import FederatedDataset
from fedrec.errors import FedrecError
from fedrec.evaluation import evaluate_test_all
from fedrec.features import ItemFeatures, build_item_features
from fedrec.federated.simulation import TrainResult, run_federated
from fedrec.model import item_embeddings
from fedrec.privacy.accountant import plan_mechanism
from fedrec.served_weight import served_biases
from fedrec.threads import use_threads
from fedrec.training.data import left_out_line, load_dataset
from fedrec.training.progress import RoundPrinter


@dataclass
class TrainedRun:
    cfg: RunConfig
    dataset: FederatedDataset
    features: ItemFeatures
    result: TrainResult
    test: dict

    @property
    def item_vectors(self) -> torch.Tensor:
        return item_embeddings(self.result.item_state, self.features, self.cfg.model)


def run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.output.artifacts_dir) / cfg.data.dataset


def trained_with(cfg: RunConfig, result: TrainResult) -> RunConfig:
    """`cfg` with the settings a run chose on validation (`local.candidates`, local.temperature = 0)
    in place of the choice: what the model was trained with, which the export's card records, the
    tower is rebuilt from and the API's fold-in solves with."""
    if result.choice is None:
        return cfg
    return dataclasses.replace(cfg, model=result.choice.model, local=result.choice.local)


def train(cfg: RunConfig, console: Console | None = None) -> TrainedRun:
    console = console or Console()
    use_threads(cfg.threads)
    t0 = time.perf_counter()
    dataset = load_dataset(cfg.data, cfg.federation.seed)
    features = build_item_features(dataset.items, cfg.model.hash_buckets)
    sizes = ", ".join(f"{m.name}:{m.n_users}" for m in dataset.merchants)
    console.print(
        f"[bold]{dataset.name}[/]: {dataset.n_items} items, {len(dataset.merchants)} merchants "
        f"(customers {sizes}); loaded in {time.perf_counter() - t0:.1f}s"
    )
    if left_out := left_out_line(dataset.protocol):
        console.print(left_out)
    printer = RoundPrinter(console, "federated", len(dataset.merchants))
    dp = plan_mechanism(cfg.privacy, cfg.federation.rounds, cfg.local.epochs)
    if dp is not None:
        how = (
            f"DP-ALS, user vectors clipped to {dp.clip}, purchases weighted to at most {dp.max_purchases}, one "
            "release a round"
            + (f" (with each merchant's counts at {dp.count_share} of it, for its item bias)" if dp.count_share else "")
            if dp.mechanism == "als"
            else f"clip {dp.clip}, sample rate {dp.sample_rate}, {dp.steps_per_round} steps a round"
        )
        console.print(
            f"customer-level DP: epsilon {cfg.privacy.epsilon} at delta {cfg.privacy.delta}, noise multiplier "
            f"{dp.noise_multiplier:.3f}, {how}"
            + (f", noise split over {dp.noise_split} merchants" if dp.noise_split else "")
        )
    result = run_federated(dataset, features, cfg.model, cfg.local, cfg.federation, on_round=printer, dp=dp)
    if result.choice is not None:  # the export serves the chosen settings
        choice = result.choice
        console.print(
            f"chosen on validation recall@20: {choice.label}; among "
            + "; ".join(f"{label} ({v:.4f})" for label, v in choice.scores.items())
            + "".join(f"; {label} skipped ({why})" for label, why in choice.skipped.items())
        )
        cfg = trained_with(cfg, result)
    if result.popularity is not None:  # a large catalogue: the prior's weight, chosen on validation
        prior = result.popularity
        console.print(
            f"popularity prior chosen on validation recall@20: weight {prior.weight:g}; among "
            + "; ".join(f"{w:g} ({v:.4f})" for w, v in prior.scores.items())
            + at_the_top(prior.weight, prior.scores, "local.sampled_popularity_weights")
        )
    if result.content_match is not None and result.content_match.scores:
        match = result.content_match
        console.print(
            f"content match chosen on validation recall@20: weight {match.weight:g}; among "
            + "; ".join(f"{w:g} ({v:.4f})" for w, v in match.scores.items())
            + at_the_top(match.weight, match.scores, "model.content_match_weights")
        )
    if result.copurchase is not None and result.copurchase.scores:
        term = result.copurchase
        console.print(
            f"co-purchase term chosen on validation (the least concentrated within one standard error of the "
            f"best recall@20): weight {term.weight:g}, lambda {term.lam:g}; among (recall@20, top-1 share) "
            + "; ".join(
                f"{k} ({v:.4f}, {term.rule.get(k, {}).get('top1_share', float('nan')):.3f})"
                for k, v in term.scores.items()
            )
        )
    item_vecs = item_embeddings(result.item_state, features, cfg.model)
    test = evaluate_test_all(dataset.merchants, result.user_embeddings, item_vecs, result.item_biases)
    if result.served_weights:  # each merchant's default popularity_weight in the API
        chosen = ", ".join(f"{name} {w.weight:g}" for name, w in result.served_weights.items())
        console.print(f"served popularity weights, chosen on each merchant's validation slice: {chosen}")
        served = served_biases(result.item_biases, result.served_weights)
        test["served"] = evaluate_test_all(dataset.merchants, result.user_embeddings, item_vecs, served)["overall"]
    return TrainedRun(cfg, dataset, features, result, test)


def at_the_top(weight: float, scores: dict[float, float], setting: str) -> str:
    """A note when validation took the largest of several candidate weights: the best may lie beyond
    the grid, which the user can widen (a choice inside the grid needs no note)."""
    if len(scores) < 2 or weight <= 0 or weight < max(scores):
        return ""
    return f" (the largest candidate: a larger weight may score higher; {setting} lists them)"


def choice_entry(result: TrainResult) -> dict | None:
    """What a run chose on validation, as the model card and the checkpoint record it."""
    c = result.choice
    return None if c is None else {"chosen": c.label, "val_recall@20": c.scores, "skipped": c.skipped}


def popularity_entry(result: TrainResult) -> dict | None:
    """The popularity prior a large-catalogue run chose on validation, as the card records it."""
    return None if result.popularity is None else result.popularity.entry()


def content_match_entry(result: TrainResult) -> dict | None:
    """The content match a run chose on validation, as the card records it (None: not chosen)."""
    return None if result.content_match is None else result.content_match.entry()


def copurchase_entry(result: TrainResult) -> dict | None:
    """The co-purchase term a run chose on validation, as the card records it (None: not chosen)."""
    return None if result.copurchase is None else result.copurchase.entry()


def served_weights_entry(result: TrainResult) -> dict[str, dict] | None:
    """Each merchant's served popularity weight, as its export file records it (None: not chosen)."""
    chosen = result.served_weights
    return None if not chosen else {name: w.entry() for name, w in chosen.items()}


def save_checkpoint(run: TrainedRun, path: Path) -> None:
    """Everything `fedrec export` needs, so exporting again needs no retraining."""
    payload = {
        "config": run.cfg.to_dict(),
        "item_state": run.result.item_state,
        "user_embeddings": run.result.user_embeddings,
        "item_biases": run.result.item_biases,
        "history": [vars(h) for h in run.result.history],
        "best_round": run.result.best_round,
        "refit_rounds": run.result.refit_rounds,
        "seconds": run.result.seconds,
        "test": run.test,
        "privacy": run.result.privacy,
        "validation_choice": choice_entry(run.result),
        "popularity_prior": popularity_entry(run.result),
        "content_match": content_match_entry(run.result),
        "copurchase": copurchase_entry(run.result),
        "served_weights": served_weights_entry(run.result),
    }
    write_with(path, lambda tmp: torch.save(payload, tmp))


CHECKPOINT_KEYS = ("config", "item_state", "user_embeddings", "history", "best_round", "seconds", "test")


def read_checkpoint(path: Path, keys: tuple[str, ...] = CHECKPOINT_KEYS) -> dict:
    """A checkpoint's dict, or one FedrecError naming the file: a truncated or foreign file (a
    disk that filled up, a copy from another tool) is the user's to move away, not a traceback.
    It is a pickle (torch.save), so only load a checkpoint this project's own run wrote."""
    try:
        ckpt = torch.load(path, weights_only=False)
    except Exception as exc:  # unpickling raises many kinds
        raise FedrecError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc}); move it away") from None
    missing = [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise FedrecError(f"{path}: not a fedrec checkpoint (missing {', '.join(missing)}); move it away")
    return ckpt
