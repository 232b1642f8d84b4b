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
from fedrec.evaluation import evaluate_test_all
from fedrec.features import ItemFeatures, build_item_features
from fedrec.federated.simulation import TrainResult, run_federated
from fedrec.model import item_embeddings
from fedrec.privacy.accountant import plan_mechanism
from fedrec.threads import use_threads
from fedrec.training.data import load_dataset
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


def with_temperature(cfg: RunConfig, temperature: float) -> RunConfig:
    """`cfg` with the temperature a run chose (local.temperature = 0) in place of 0: what the model
    was trained with, which the export's card records and the API's fold-in solves with."""
    return dataclasses.replace(cfg, local=dataclasses.replace(cfg.local, temperature=temperature))


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
    printer = RoundPrinter(console, "federated", len(dataset.merchants))
    dp = plan_mechanism(cfg.privacy, cfg.federation.rounds, cfg.local.epochs)
    if dp is not None:
        console.print(
            f"customer-level DP: epsilon {cfg.privacy.epsilon} at delta {cfg.privacy.delta}, noise multiplier "
            f"{dp.noise_multiplier:.3f}, clip {dp.clip}, sample rate {dp.sample_rate}, "
            f"{dp.steps_per_round} steps a round"
        )
    result = run_federated(dataset, features, cfg.model, cfg.local, cfg.federation, on_round=printer, dp=dp)
    if result.temperature is not None:  # local.temperature = 0: the export serves the chosen one
        console.print(
            f"temperature {result.temperature:g}, chosen on validation recall@20 among "
            + ", ".join(f"{t} ({v:.4f})" for t, v in result.temperature_scores.items())
        )
        cfg = with_temperature(cfg, result.temperature)
    item_vecs = item_embeddings(result.item_state, features, cfg.model)
    test = evaluate_test_all(dataset.merchants, result.user_embeddings, item_vecs, result.item_biases)
    return TrainedRun(cfg, dataset, features, result, test)


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
        "temperature_scores": run.result.temperature_scores,
    }
    write_with(path, lambda tmp: torch.save(payload, tmp))
