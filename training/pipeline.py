"""Train -> checkpoint -> export, and export again from a checkpoint."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from fedrec.config import RunConfig, aggregation_rule, config_from_dict
from fedrec.errors import FedrecError
from fedrec.training.data import load_dataset
from fedrec.training.export import export_catalogue, new_items_entry, write_export
from fedrec.training.train import (
    TrainedRun,
    choice_entry,
    content_match_entry,
    copurchase_entry,
    popularity_entry,
    read_checkpoint,
    run_dir,
    save_checkpoint,
    served_weights_entry,
    train,
)


def _card(
    cfg: RunConfig,
    dataset,
    history: list[dict],
    best_round: int,
    seconds: float,
    test: dict,
    dp: dict | None = None,
    refit_rounds: int = 0,
    validation_choice: dict | None = None,
    popularity_prior: dict | None = None,
    content_match: dict | None = None,
    copurchase: dict | None = None,
) -> dict:
    return {
        "dataset": dataset.name,
        "data": dataset.summary(),
        "protocol": dataset.protocol,
        "rounds": len(history),
        "best_round": best_round,
        # > 0: the released model was retrained for this many rounds on train + validation (under DP: the
        # one run trained on train + validation from its first round)
        "refit_rounds": refit_rounds,
        "train_seconds": round(seconds, 2),
        # local.candidates (or local.temperature = 0): each candidate's validation recall@20 and the one
        # kept; `config` holds the kept settings
        "validation_choice": validation_choice,
        # Above the full-softmax switch: the weight of w log(1 + buyers) added to every score, chosen on
        # validation (fedrec/federated/popularity_prior.py); null: no prior
        "popularity_prior": popularity_prior,
        # Products' vectors end with the content block z and customers' with w p (score += w p . z),
        # the weight chosen on validation (fedrec/content_match.py); null or weight 0: none
        "content_match": content_match,
        # After it, products' vectors end with s B' (EASE's B from the summed Gram) and customers' with
        # w x (their purchase rows), lambda and w chosen on validation (fedrec/copurchase.py); null or
        # weight 0: none
        "copurchase": copurchase,
        "merchants": [m.name for m in dataset.merchants],
        "new_items": new_items_entry(cfg),
        "metrics": {
            "test": test["overall"],
            "per_merchant": test["per_merchant"],
            # where merchants chose served popularity weights: test at those (what the API serves by default)
            **({"test_served": test["served"]} if "served" in test else {}),
        },
        # `aggregation` as used (auto resolved: fedrec/federated/aggregation.py)
        "federation": {**cfg.to_dict()["federation"], "aggregation": aggregation_rule(cfg, dataset.n_items)},
        "runtime": "inprocess",
        "privacy": {
            "shared": "item tower only (item-id embeddings, content-token embeddings, MLP)",
            "user_embeddings": "kept by each merchant; never sent",
            "merchant_item_bias": ("kept by each merchant; never sent" if cfg.model.merchant_item_bias else "not used"),
            "coordinator_sees": "each merchant's sums (in-process runtime: every merchant in one process)",
            "copurchase_gram": (
                "co-purchase counts summed over merchants (in-process); EASE's B from them is in this export"
                if copurchase and copurchase.get("weight", 0) > 0
                else "not used"
            ),
            "differential_privacy": dp,
            "secure_aggregation": False,
        },
        "config": cfg.to_dict(),
    }


def train_and_export(cfg: RunConfig, console: Console) -> tuple[TrainedRun, Path]:
    run = train(cfg, console)
    cfg = run.cfg  # with the settings it chose on validation, if it chose
    root = run_dir(cfg)
    save_checkpoint(run, root / "checkpoint.pt")
    history = [vars(h) for h in run.result.history]
    res = run.result
    card = _card(
        cfg, run.dataset, history, res.best_round, res.seconds, run.test, res.privacy, res.refit_rounds,
        choice_entry(res), popularity_entry(res), content_match_entry(res), copurchase_entry(res),
    )  # fmt: skip
    items, vecs = export_catalogue(cfg, run.dataset.items, run.dataset.new_items, run.result.item_state)
    path = write_export(
        root,
        cfg,
        run.dataset,
        items,
        run.result.item_state,
        vecs,
        run.result.user_embeddings,
        card,
        run.result.item_biases,
        served_weights_entry(res),
    )
    if res.privacy and res.refit_rounds:
        released = "DP: one run on train + validation, the last round released"
    elif res.refit_rounds:
        released = f"best round {res.best_round}; released: retrained {res.refit_rounds} rounds on train + validation"
    else:
        released = f"best round {res.best_round}"
    console.print(
        f"\ntrained {len(history)} rounds in {res.seconds:.1f}s ({released})\n"
        f"shared export:       {path}\n"
        f"merchant embeddings: {root / 'merchants'}/<merchant>/{path.name}\n"
        f"checkpoint:          {root / 'checkpoint.pt'}"
    )
    return run, path


def export_from_checkpoint(cfg: RunConfig, console: Console) -> Path:
    root = run_dir(cfg)
    ckpt_path = root / "checkpoint.pt"
    if not ckpt_path.is_file():
        raise FedrecError(f"{ckpt_path}: no checkpoint; run `fedrec train` for this dataset first")
    ckpt = read_checkpoint(ckpt_path)
    train_cfg = config_from_dict(ckpt["config"])
    dataset = load_dataset(train_cfg.data, train_cfg.federation.seed)
    items, vecs = export_catalogue(train_cfg, dataset.items, dataset.new_items, ckpt["item_state"])
    export_cfg = RunConfig(**{**vars(train_cfg), "output": cfg.output})
    card = _card(
        export_cfg, dataset, ckpt["history"], ckpt["best_round"], ckpt["seconds"], ckpt["test"], ckpt.get("privacy"),
        ckpt.get("refit_rounds", 0), ckpt.get("validation_choice"), ckpt.get("popularity_prior"),
        ckpt.get("content_match"), ckpt.get("copurchase"),
    )  # fmt: skip
    path = write_export(
        root,
        export_cfg,
        dataset,
        items,
        ckpt["item_state"],
        vecs,
        ckpt["user_embeddings"],
        card,
        ckpt.get("item_biases"),
        ckpt.get("served_weights"),
    )
    console.print(f"shared export: {path}")
    return path
