"""The file default on data it was not tuned on: a shipped dataset written as a plain purchase file.

Issue 9 judges the defaults of `--dataset file` on a held-back shop. This probe does what a new
user would: write a shipped dataset's purchases as one CSV (MovieLens without titles or genres,
the synthetic shop with its product metadata), train it with `training/configs/file.toml` and
nothing else, and record which candidate validation chose and the refit's test metrics.
The CSV lives in a temporary folder only: MovieLens may not be copied into the project.
Generated shops (`datasets/marketplace.py`): `new-shop` is the file `make evaluate-new-shop` reads
(its references come from that run); `large-shop` has a catalogue past the full softmax and the
co-purchase term, and `complement-shop` customers who buy complements of earlier purchases. No
shipped config has run those two, so their references (ALS with settings chosen on validation,
popularity, EASE and item-kNN where they fit) are fitted here on the same file's split.

`python -m fedrec.training.probe_file_default --source synthetic` writes
`results/probe-file-default-synthetic.json`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from fedrec.atomic import write_json
from fedrec.config import load_config, parse_sets
from fedrec.errors import FedrecError
from fedrec.metrics import seed_std
from fedrec.training.train import choice_entry, content_match_entry, copurchase_entry, train

SOURCES = ("movielens", "synthetic", "new-shop", "large-shop", "complement-shop")
RESULTS = Path("results")
# The same purchases under their shipped configs, from `make evaluate`: what the file default is held to.
SHIPPED = {
    "movielens": "evaluation-movielens-100k.json",
    "synthetic": "evaluation-synthetic.json",
    "new-shop": "evaluation-new-shop.json",
}
GENERATED = {"new-shop": "NEW_SHOP", "large-shop": "LARGE_SHOP", "complement-shop": "COMPLEMENT_SHOP"}


def write_plain_file(source: str, path: Path) -> None:
    """`source`'s purchases as the generic loader reads them: merchant, user, item, timestamp, and
    for the synthetic shop its product columns (title, description, category, price); the
    generated shops have none."""
    if source == "movielens":
        from fedrec.datasets import movielens

        movielens.load().interactions.select("merchant", "user", "item", "timestamp").write_csv(path)
    elif source == "synthetic":
        from fedrec.datasets import synthetic

        purchases, products = synthetic.generate()
        purchases.join(products, on="item").write_csv(path)
    elif source in GENERATED:
        from fedrec.datasets import marketplace

        marketplace.write_purchase_file(path, getattr(marketplace, GENERATED[source]))
    else:
        raise ValueError(f"source {source!r}: one of {', '.join(SOURCES)}")


def probe(
    source: str, seeds: tuple[int, ...], workers: int, console: Console, sets: dict[str, Any] | None = None
) -> dict:
    """Train the file default on `source` written as a file, once per seed; the run's choice and test
    metrics, and for a source without a shipped config the references on the same file. `sets`
    changes the file default (a variant beside the probe of the default itself, whose file holds
    the references: they do not depend on it, so a variant does not fit them again)."""
    from fedrec.training.cli import default_config_path

    per_seed = {}
    with tempfile.TemporaryDirectory(prefix="fedrec-probe-") as tmp:
        path = Path(tmp) / f"{source}.csv"
        write_plain_file(source, path)
        refs = None if source in SHIPPED or sets else file_references(path, seeds, console)
        for seed in seeds:
            overrides = {
                "data.path": str(path),
                "output.artifacts_dir": str(Path(tmp) / "artifacts"),
                "threads": 1,
                "federation.workers": workers,
                "federation.seed": seed,
                **(sets or {}),
            }
            run = train(load_config(default_config_path("file"), overrides), console)
            res = run.result
            per_seed[seed] = {
                "validation_choice": choice_entry(res),
                "content_match": content_match_entry(res),
                "copurchase": copurchase_entry(res),
                "best_round": res.best_round,
                "refit_rounds": res.refit_rounds,
                "train_seconds": round(res.seconds, 2),
                "test": run.test["overall"],
            }
    recall = [per_seed[s]["test"]["recall@20"] for s in seeds]
    return {
        "what": f"the file default (training/configs/file.toml) on {source} written as a plain purchase file"
        + "".join(f", with {k} = {json.dumps(v)}" for k, v in (sets or {}).items()),
        "command": f"make probe-file-default SOURCE={source} EVAL_WORKERS={workers}",
        "date": datetime.date.today().isoformat(),
        "seeds": list(seeds),
        "recall@20": statistics.mean(recall),
        "recall@20_std": seed_std(recall),
        "recall@20_per_seed": recall,
        "per_seed": per_seed,
        **({} if refs is None else {"references": refs}),
    }


def file_references(path: Path, seeds: tuple[int, ...], console: Console) -> dict:
    """recall@20 of implicit's ALS (settings chosen on validation, one fit per seed), popularity, and
    EASE and item-kNN where they fit, on the file's own split, as `make evaluate` fits them."""
    from fedrec.training.cli import default_config_path
    from fedrec.training.data import load_dataset
    from fedrec.training.evaluate import make_scorer, references

    cfg = load_config(default_config_path("file"), {"data.path": str(path), "threads": 1})
    dataset = load_dataset(cfg.data, cfg.federation.seed)
    refs = references(dataset, seeds, make_scorer(dataset, cfg), console)
    out: dict = {"fitted_on": "the same file's split (references in training/evaluate.py)"}
    for name, entry in refs.items():
        if "skipped" in entry:
            out[name] = {"skipped": entry["skipped"]}
            continue
        out[name] = _recall(entry)
        if "settings" in entry:
            out[name]["settings"] = {k: v for k, v in entry["settings"].items() if k != "validation"}
    return out


def _recall(entry: dict) -> dict:
    """recall@20 and its spread over seeds (None for a deterministic method) of a results entry."""
    return {"recall@20": entry["overall"]["recall@20"], "recall@20_std": entry.get("recall@20_std")}


def shipped_references(source: str, results: Path) -> dict | None:
    """recall@20 of the shipped config's federated model, ALS and EASE on the same purchases, if measured."""
    path = results / SHIPPED[source]
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    return {
        "file": str(path),
        **{name: _recall(r[name]) for name in ("federated", "implicit_als", "ease") if name in r},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", choices=SOURCES, required=True)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="merchants trained at once (same numbers as 1)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="change the file default")
    p.add_argument("--out", type=Path, help="results file (default: <results>/probe-file-default-<source>.json)")
    args = p.parse_args(argv)
    try:
        res = probe(args.source, tuple(range(args.seeds)), args.workers, Console(), parse_sets(args.set))
    except FedrecError as e:  # e.g. MovieLens not found: one line, no traceback
        sys.exit(f"error: {e}")
    if args.source in SHIPPED:
        res["shipped_config"] = shipped_references(args.source, args.results)
    out = args.out or args.results / f"probe-file-default-{args.source}.json"
    if args.set or args.out:
        res["command"] += f" PROBE_SET='{' '.join(f'--set {item}' for item in args.set)} --out {out}'"
    write_json(out, res)
    print(f"recall@20 {res['recall@20']:.4f} ± {res['recall@20_std']:.4f}; results: {out}")


if __name__ == "__main__":
    main()
