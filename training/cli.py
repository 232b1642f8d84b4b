"""The `fedrec` command line: train, evaluate, evaluate-foldin, export, serve, download, federation.

Every user-fixable problem (FedrecError) is printed as one `error:` line with exit code 2.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from fedrec.errors import ConfigError, FedrecError
from fedrec.training.federation import app as federation_app
from fedrec.training.friendly import friendly

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.splitlines()[0])
app.add_typer(federation_app, name="federation")
console = Console()

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML or YAML run configuration.")]
DatasetOpt = Annotated[
    str | None, typer.Option("--dataset", "-d", help="synthetic | movielens-100k | file (overrides the config).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override one setting, e.g. --set federation.rounds=20 (repeatable)."),
]


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def default_config_path(dataset: str | None) -> Path | None:
    """The shipped config tuned for a dataset, when there is one (installed as package data)."""
    candidate = CONFIG_DIR / f"{dataset or 'synthetic'}.toml"
    return candidate if candidate.is_file() else None


def _config(config: Path | None, dataset: str | None, sets: list[str] | None):
    from fedrec.config import load_config, parse_sets

    overrides = parse_sets(sets)
    if dataset:
        overrides["data.dataset"] = dataset
    if config is None:
        config = default_config_path(dataset)
    cfg = load_config(config, overrides)
    for setting, folder in (
        ("output.artifacts_dir", cfg.output.artifacts_dir),
        ("output.results_dir", cfg.output.results_dir),
    ):
        _check_output_folder(setting, Path(folder))
    return cfg


def _check_output_folder(setting: str, folder: Path) -> None:
    """Refuse, before any training, an output folder that cannot be made or written: one under a
    file, or a read-only one (else the run would end in a traceback at its first write)."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == p.parent)
    if not existing.is_dir():
        raise ConfigError(f"{setting} = {str(folder)!r}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{setting} = {str(folder)!r}: {existing} is not writable")


@app.command()
@friendly
def train(config: ConfigOpt = None, dataset: DatasetOpt = None, set_: SetOpt = None) -> None:
    """Train the two-tower model by federated learning and write a versioned export."""
    from fedrec.training.pipeline import train_and_export

    cfg = _config(config, dataset, set_)
    run, export_dir = train_and_export(cfg, console)
    console.print(f"\nfinal test recall@20 (federated): [bold]{run.test['overall']['recall@20']:.4f}[/]")
    if "served" in run.test:
        console.print(f"at the served popularity weights: [bold]{run.test['served']['recall@20']:.4f}[/]")


@app.command()
@friendly
def evaluate(
    config: ConfigOpt = None,
    dataset: DatasetOpt = None,
    set_: SetOpt = None,
    quiet_rounds: Annotated[bool, typer.Option(help="Hide per-round lines.")] = False,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per trained method (0, 1, ...); mean and spread.")] = 3,
    ablations: Annotated[bool, typer.Option(help="Also train the variants that flip one design choice.")] = True,
    only_cold_start: Annotated[
        bool, typer.Option(help="Rerun only the cold-start section of the existing results file.")
    ] = False,
    only_references: Annotated[
        bool,
        typer.Option(help="Rerun only implicit ALS, popularity, EASE and item-kNN in the existing results file."),
    ] = False,
) -> None:
    """Compare federated, centralized, local-only, popularity, implicit ALS, EASE and item-kNN (recall/NDCG)."""
    from fedrec.training.evaluate import evaluate as run_eval
    from fedrec.training.evaluate import markdown_table, rerun_cold_start, rerun_references, write_results

    cfg = _config(config, dataset, set_)
    if only_cold_start and only_references:
        raise FedrecError("--only-cold-start and --only-references: give one of them")
    rerun = rerun_cold_start if only_cold_start else rerun_references if only_references else None
    if rerun is not None:
        for kind, path in rerun(cfg, console, tuple(range(seeds))).items():
            console.print(f"{kind}: {path}")
        return
    res = run_eval(cfg, console, quiet_rounds=quiet_rounds, seeds=tuple(range(seeds)), ablations=ablations)
    paths = write_results(res, Path(cfg.output.results_dir))
    console.print(markdown_table(res), markup=False, highlight=False)
    for kind, path in paths.items():
        console.print(f"{kind}: {path}")


@app.command("privacy-report")
@friendly
def privacy_report_cmd(
    config: ConfigOpt = None,
    dataset: DatasetOpt = None,
    set_: SetOpt = None,
    epsilons: Annotated[str, typer.Option(help="Comma-separated budgets; inf = no DP.")] = "1,2,4,8,16,inf",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per budget (0, 1, ...).")] = 3,
    dp_rounds: Annotated[int, typer.Option(min=1, help="Rounds of each DP run (the last is released).")] = 20,
    dp_set: Annotated[
        list[str] | None,
        typer.Option("--dp-set", help="KEY=VALUE for the DP runs only, e.g. privacy.noise_split=6 (repeatable)."),
    ] = None,
) -> None:
    """Recall@20 against epsilon (customer-level DP): results/privacy-report.json, .md and .png."""
    import sys

    from fedrec.training.privacy_report import privacy_report, write_report

    eps = _comma_numbers(
        "--epsilons", epsilons, lambda e: e > 0, "expected numbers or inf, e.g. 1,8,inf",
        "every budget must be > 0 (inf = no DP)",
    )  # fmt: skip
    from fedrec.config import parse_sets

    cfg = _config(config, dataset, set_)
    dp_sets = parse_sets(dp_set)
    for key in dp_sets:
        if "." not in key:
            raise FedrecError(f"--dp-set {key!r}: expected SECTION.KEY=VALUE, e.g. privacy.noise_split=6")
    rows = privacy_report(cfg, list(eps), list(range(seeds)), dp_rounds, console, dp_sets)
    paths = write_report(rows, Path(cfg.output.results_dir), "fedrec " + " ".join(sys.argv[1:]))
    console.print(f"results: {paths['json']}, {paths['md']}, {paths['png']}")


@app.command("attack-report")
@friendly
def attack_report_cmd(
    config: ConfigOpt = None,
    dataset: DatasetOpt = None,
    set_: SetOpt = None,
    epsilon: Annotated[float, typer.Option(min=0.0, help="Budget of the DP settings.")] = 8.0,
    dp_rounds: Annotated[int, typer.Option(min=1, help="Schedule the DP noise is planned for.")] = 20,
    poison_rounds: Annotated[int, typer.Option(min=1, help="Rounds of each poisoning run.")] = 20,
    seeds: Annotated[int, typer.Option(min=1, help="Poisoning: seeds (each with its own target).")] = 3,
    colluders: Annotated[
        int, typer.Option(min=1, help="Poisoning: also run this many colluding fake merchants (1: skip).")
    ] = 3,
    camouflage: Annotated[
        float,
        typer.Option(
            min=0.0,
            help="Poisoning: each fake merchant adds noise of its own to every row but the target's, this many "
            "times the row's norm, so that colluders look unalike (0: off).",
        ),
    ] = 0.0,
    direction: Annotated[
        str,
        typer.Option(
            help="Poisoning: where the crafted target row points each round: fresh (a new random direction), "
            "fixed (one kept every round) or popular (the popular products' mean); the last two are adapted "
            "to a bound on each row."
        ),
    ] = "fresh",
    through: Annotated[
        str,
        typer.Option(
            help="Poisoning: the target's rows the attacker crafts: id (its id row) or tokens (its id row and its "
            "content-token rows, adapted to a bound on each row)."
        ),
    ] = "id",
    split_set: Annotated[
        list[str] | None,
        typer.Option(
            "--split-set",
            help="KEY=VALUE for split-noise rows (leakage, membership), e.g. privacy.noise_split=6 (repeatable).",
        ),
    ] = None,
    parts: Annotated[
        str, typer.Option(help="Comma-separated: leakage, membership, poisoning; the file keeps the others.")
    ] = "leakage,membership,poisoning",
    rules: Annotated[
        str,
        typer.Option(help="Poisoning: comma-separated aggregation rules to run; the file keeps the other rules' rows."),
    ] = "none,norm_clip,row_clip,row_clip_foolsgold,trimmed_mean,median",
    clip_multiples: Annotated[
        str | None,
        typer.Option(
            help="Poisoning: the clipping rules' bounds to run, in multiples of the round's medians (>= 1); "
            "default: the configured federation.clip_multiple."
        ),
    ] = None,
    sum_clips: Annotated[
        str | None,
        typer.Option(
            help="Poisoning: also run the sum-form rule with federation.sum_clip at each of these (>= 1): each row "
            "of the round's aggregate bounded, the one bound secure aggregation allows."
        ),
    ] = None,
    groups: Annotated[
        int,
        typer.Option(
            min=0,
            help="Poisoning: the robust rules read the sums of this many random groups of each round's merchants "
            "(federation.robust_groups: one secure sum per group), not each merchant's update (0: off).",
        ),
    ] = 0,
) -> None:
    """Leakage (with and without SecAgg and DP), membership and poisoning attacks: results/attack-report.json."""
    import dataclasses
    import sys

    from fedrec.config import parse_sets, with_overrides
    from fedrec.federated.robust import ROBUST_RULES
    from fedrec.training.attack_report import (
        PoisonConfig,
        check_poisoning,
        leakage_report,
        membership_report,
        poisoning_report,
        write_attack_report,
    )

    if not epsilon > 0:
        raise FedrecError(f"--epsilon {epsilon}: must be > 0")
    cfg = _config(config, dataset, set_)
    split = None
    if split_set:
        sets = parse_sets(split_set)
        n = sets.get("privacy.noise_split")
        if not isinstance(n, int) or n < 2:
            raise FedrecError("--split-set: the split-noise rows need privacy.noise_split=N with N >= 2")
        if "privacy.epsilon" in sets:  # every row is labelled with --epsilon: one budget for all
            raise FedrecError("--split-set privacy.epsilon: the split-noise rows use --epsilon, like the others")
        split = with_overrides(cfg, {"privacy.epsilon": epsilon, **sets})
    # every flag is checked before the first report runs: a bad one fails at once, not after leakage
    chosen = _comma_choices("--parts", parts, ("leakage", "membership", "poisoning"))
    robust_rules = _comma_choices("--rules", rules, ROBUST_RULES)
    at_least_1 = "expected comma-separated numbers >= 1, e.g. 1,2,4"
    multiples = (
        (cfg.federation.clip_multiple,)
        if clip_multiples is None
        else _comma_numbers("--clip-multiples", clip_multiples, lambda m: m >= 1, at_least_1)
    )
    bounds = () if sum_clips is None else _comma_numbers("--sum-clips", sum_clips, lambda m: m >= 1, at_least_1)
    poison = PoisonConfig(
        rounds=poison_rounds,
        seeds=tuple(range(seeds)),
        rules=robust_rules,
        clip_multiples=multiples,
        camouflage=camouflage,
        direction=direction,
        through=through,
        sum_clips=bounds,
        robust_groups=groups,
    )
    check_poisoning(cfg, poison)
    if "leakage" in chosen:
        res = leakage_report(cfg, epsilon, dp_rounds, console, split, groups)
    else:  # the dataset's name, which says whether an earlier report's other sections can stay
        from fedrec.training.data import load_dataset

        res = {"dataset": load_dataset(cfg.data, cfg.federation.seed).name}
    if "membership" in chosen:
        res["membership"] = membership_report(cfg, epsilon, dp_rounds, console, split)
    if "poisoning" in chosen:
        clean_runs: dict = {}  # the runs without an attacker are the same for both sections
        res["poisoning"] = poisoning_report(cfg, console, poison, clean_runs)
        if colluders > 1:
            res["poisoning_colluding"] = poisoning_report(
                cfg, console, dataclasses.replace(poison, attackers=colluders), clean_runs
            )
    path = write_attack_report(res, Path(cfg.output.results_dir), "fedrec " + " ".join(sys.argv[1:]))
    for setting, r in res.get("leakage", {}).items():
        console.print(f"{setting:>15}: precision {r['precision']:.3f}  recall {r['recall']:.3f}  AUC {r['auc']:.3f}")
    for setting, r in res.get("membership", {}).items():
        console.print(f"membership {setting}: AUC {r['auc']:.3f}")
    for part in ("poisoning", "poisoning_colluding"):
        for rule, r in res.get(part, {}).get("rules", {}).items():
            console.print(
                f"{part} ({res[part]['attackers']} fake) {rule:>12}: target exposure {r['target_exposure']:.3f} "
                f"(clean {r['clean_exposure']:.3f}), recall@20 {r['recall@20']:.4f} (clean {r['clean_recall@20']:.4f})"
            )
    console.print(f"results: {path}")


def _comma_choices(flag: str, text: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated option's values, each one of `allowed`, at least one."""
    chosen = tuple(v.strip() for v in text.split(",") if v.strip())
    if not chosen or set(chosen) - set(allowed):
        raise FedrecError(f"{flag} {text!r}: choose from {', '.join(allowed)}")
    return chosen


def _comma_numbers(
    flag: str, text: str, valid: Callable[[float], bool], not_numbers: str, out_of_range: str | None = None
) -> tuple[float, ...]:
    """A comma-separated option's numbers, at least one, each passing `valid` (a comparison, so NaN
    fails it); `out_of_range` is the message when one does not (default: `not_numbers`)."""
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise FedrecError(f"{flag} {text!r}: {not_numbers}") from None
    if not values or not all(valid(v) for v in values):
        raise FedrecError(f"{flag} {text!r}: {out_of_range or not_numbers}")
    return values


@app.command("compare-on-validation")
@friendly
def compare_on_validation(
    setting: Annotated[str, typer.Option(help="The setting compared, e.g. federation.aggregation.")],
    candidates: Annotated[str, typer.Option(help="Comma-separated values, e.g. fedavg,rowwise.")],
    config: ConfigOpt = None,
    dataset: DatasetOpt = None,
    set_: SetOpt = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per candidate (0, 1, ...).")] = 3,
    tag: Annotated[
        str, typer.Option(help="Added to the results file's name, to keep searches of one setting apart.")
    ] = "",
) -> None:
    """Choose one setting's value by best validation recall@20 over seeds (test is never evaluated)."""
    from fedrec.config import parse_sets
    from fedrec.training.compare_on_validation import compare_on_validation as run_compare
    from fedrec.training.compare_on_validation import parse_candidates

    overrides = parse_sets(set_)
    if dataset:
        overrides["data.dataset"] = dataset
    base = config or default_config_path(dataset)
    run_compare(base, overrides, setting, parse_candidates(candidates), seeds, console, tag)


@app.command("validate-cold-start")
@friendly
def validate_cold_start(
    config: ConfigOpt = None,
    dataset: DatasetOpt = None,
    set_: SetOpt = None,
    seeds: Annotated[int, typer.Option(min=1, help="Seeds (0, 1, ...).")] = 3,
) -> None:
    """Score model.new_item_neighbours on the validation slice's new products (test is never read)."""
    from fedrec.training.cold_start import validate_cold_start as run_validate

    res, path = run_validate(_config(config, dataset, set_), console, tuple(range(seeds)))
    if "best" in res:
        verdict = "ahead by more than the spread" if res["clear"] else "its lead is within the spread"
        console.print(f"best on validation: {res['best']} ({verdict}; configured: {res['configured']})")
    console.print(f"results: {path}")


@app.command("evaluate-foldin")
@friendly
def evaluate_foldin(
    config: ConfigOpt = None,
    dataset: DatasetOpt = None,
    set_: SetOpt = None,
    users: Annotated[int, typer.Option(min=1, help="Test customers sampled per merchant.")] = 300,
) -> None:
    """Measure the basket fold-in rules (anonymous customers) against learned user vectors."""
    from fedrec.training.evaluate_foldin import evaluate_foldin as run_foldin
    from fedrec.training.evaluate_foldin import write_foldin_results

    cfg = _config(config, dataset, set_)
    res = run_foldin(cfg, console, users)
    path = write_foldin_results(res, Path(cfg.output.results_dir))
    console.print(f"best fold-in rule: {res['best']}\nresults: {path}")


@app.command()
@friendly
def export(config: ConfigOpt = None, dataset: DatasetOpt = None, set_: SetOpt = None) -> None:
    """Write a new export version from the last training checkpoint (no retraining)."""
    from fedrec.training.pipeline import export_from_checkpoint

    cfg = _config(config, dataset, set_)
    export_from_checkpoint(cfg, console)


@app.command()
@friendly
def serve(
    export: Annotated[
        Path, typer.Option(help="Exports root (its LATEST is watched for new versions) or one version directory.")
    ] = Path("artifacts/synthetic/exports"),
    merchant: Annotated[str | None, typer.Option(help="Merchant whose customers this service knows.")] = None,
    merchant_dir: Annotated[
        Path | None, typer.Option(help="That merchant's private files (default: <export>/../merchants/<merchant>).")
    ] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes (each holds the index in memory).")] = 1,
    watch_interval: Annotated[float, typer.Option(help="Seconds between checks for a new export; 0: off.")] = 2.0,
    foldin: Annotated[str, typer.Option(help="Basket fold-in rule: softmax, mean or ridge.")] = "softmax",
    foldin_reg: Annotated[float, typer.Option(help="Fold-in L2 regularisation (see make evaluate-foldin).")] = 1.0,
    ef_search: Annotated[int | None, typer.Option(min=1, help="HNSW search depth (default: the export's).")] = None,
    nprobe: Annotated[
        int | None, typer.Option(min=1, help="IVF or ivfpq lists scanned per query (default: the export's).")
    ] = None,
    max_body_bytes: Annotated[
        int, typer.Option(min=1, help="Larger request bodies get a 413 before they are read.")
    ] = 1_000_000,
    threads: Annotated[int, typer.Option(min=1, help="BLAS/OpenMP threads per worker.")] = 1,
    log_level: Annotated[
        str, typer.Option(help="uvicorn log level: critical, error, warning, info, debug or trace.")
    ] = "info",
) -> None:
    """Serve recommendations over HTTP (FastAPI + FAISS); docs at /docs, demo page at /.

    POST /v1/admin/reload is enabled when FEDREC_ADMIN_TOKEN is set in the environment.
    """
    import os
    import tempfile

    import uvicorn

    from fedrec.serving.export_store import load_export
    from fedrec.serving.settings import ENV_VAR, ServeSettings

    if log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"--log-level {log_level!r}: choose one of {', '.join(LOG_LEVELS)}")
    settings = ServeSettings(
        export=str(export),
        merchant=merchant,
        merchant_dir=str(merchant_dir) if merchant_dir else None,
        watch_interval=watch_interval,
        foldin_method=foldin,
        foldin_reg=foldin_reg,
        ef_search=ef_search,
        nprobe=nprobe,
        max_body_bytes=max_body_bytes,
        threads=threads,
    )
    # Refuse a broken export here, as one clear line, before any worker starts.
    loaded = load_export(export, merchant, merchant_dir)
    console.print(
        f"serving export {loaded.version} ({loaded.n_items} items, {loaded.kind} index)"
        + (f" for merchant {merchant} ({len(loaded.merchant.user_ids)} customers)" if loaded.merchant else "")
        + f" on http://{host}:{port}  (docs: /docs, demo: /)"
    )
    del loaded
    os.environ[ENV_VAR] = settings.to_env()
    if workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="fedrec-metrics-")
    uvicorn.run(
        "fedrec.serving.app:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level.lower(),
        access_log=False,
    )


@app.command("generate-shop")
@friendly
def generate_shop(
    out: Annotated[Path, typer.Argument(help="Purchase file to write (CSV).")],
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Generator seed.")] = 1,
) -> None:
    """Write a generated sparse shop without product metadata (600 customers, 8 merchants), to check
    the defaults for a new shop's file on data nothing was tuned on."""
    import dataclasses

    from fedrec.datasets.marketplace import NEW_SHOP, write_purchase_file

    if out.suffix.lower() != ".csv":
        raise FedrecError(f"{out}: the generated shop is written as CSV; give a .csv file name")
    if out.is_dir():
        raise FedrecError(f"{out}: is a folder; give a .csv file name")
    try:
        rows = write_purchase_file(out, dataclasses.replace(NEW_SHOP, seed=seed))
    except OSError as exc:  # a parent that is a file, a read-only folder, a full disk
        raise FedrecError(f"{out}: cannot write ({exc.strerror or exc})") from None
    console.print(f"{out}: {rows} purchases; evaluate with --dataset file --set data.path={out}")


@app.command()
@friendly
def download(
    name: Annotated[str, typer.Argument(help="Dataset to fetch: movielens-100k.")] = "movielens-100k",
    dest: Annotated[Path | None, typer.Option(help="Target folder (default ~/.cache/fedrec/movielens-100k).")] = None,
    url: Annotated[str | None, typer.Option(help="Archive URL (default: the official GroupLens one).")] = None,
) -> None:
    """Download a public dataset (needs internet; checksums are verified)."""
    from fedrec.datasets import movielens

    if name != "movielens-100k":
        raise FedrecError(f"unknown dataset {name!r}; downloadable: movielens-100k")
    path = movielens.download(dest, url or movielens.OFFICIAL_URL)
    console.print(
        f"MovieLens-100K is in {path}; use it with --dataset movielens-100k "
        f"(set {movielens.ENV_VAR}={path} if it is not the default folder)"
    )


if __name__ == "__main__":  # pragma: no cover
    app()
