"""Run configuration: small frozen dataclasses, loaded from TOML or YAML.

Unknown sections or keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import tomllib
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from fedrec.errors import ConfigError
from fedrec.federated.aggregation import RULES, resolve_rule
from fedrec.federated.candidates import flat_overrides
from fedrec.federated.groups import MIN_GROUP, MIN_GROUPS
from fedrec.federated.ials_item_step import exact_step_problems
from fedrec.federated.local import LocalConfig
from fedrec.federated.robust import ROBUST_RULES
from fedrec.federated.server_opt import SERVER_OPTIMIZERS
from fedrec.federated.simulation import FederationConfig
from fedrec.federated.upload import PRECISIONS
from fedrec.index_kinds import INDEX_KINDS
from fedrec.losses import LOSSES
from fedrec.model import ModelConfig, item_tower_shapes
from fedrec.privacy.config import PrivacyConfig, privacy_errors

DATASETS = ("synthetic", "movielens-100k", "file")
PARTITIONS = ("natural", "dirichlet", "quantity")  # datasets/partition.py (the core may not import it)


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "synthetic"
    path: str = ""  # purchase file, for dataset = "file"
    catalogue_path: str = ""  # optional product file (dataset = "file"): adds products nobody bought yet
    movielens_dir: str = ""  # else $FEDREC_MOVIELENS_DIR, ../shared/datasets, download cache
    merchants: list[str] = field(default_factory=list)  # known merchants (file); empty = any
    # A file's own names for the columns (dataset = "file"; the catalogue file shares item_column)
    user_column: str = "user"
    item_column: str = "item"
    timestamp_column: str = "timestamp"
    merchant_column: str = "merchant"
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    min_positives: int = 5
    # Who is whose customer (datasets/partition.py): natural | dirichlet (category skew) | quantity
    partition: str = "natural"
    partition_merchants: int = 10  # dirichlet and quantity: number of merchants, 2 to 1000
    partition_alpha: float = 0.5  # Dirichlet concentration: small = strong skew


@dataclass(frozen=True)
class OutputConfig:
    artifacts_dir: str = "artifacts"
    results_dir: str = "results"
    index: str = "auto"  # flat | ivf | ivfpq | hnsw | auto (flat below 100k items, else ivfpq)


@dataclass(frozen=True)
class NetworkConfig:
    """The networked runtime (Flower): secure aggregation and its public bounds (fedrec/federated/wire.py)."""

    secagg: bool = True  # SecAgg+: the coordinator can decode only the sum over merchants
    min_merchants: int = 3  # fewer in a round: the round is refused, never sent in the clear
    # Public bound on one merchant's training purchases (n_k): every sum is divided by it before
    # quantisation, so it must not be exceeded (a merchant above it refuses to send).
    max_weight: float = 100_000.0
    clipping_range: float = 8.0  # SecAgg+ clips each scaled value to +-this
    quantization_range: int = 2**24  # levels per value; times the merchants must stay < 2**32
    num_shares: float = 1.0  # share of the round's merchants each secret is split between
    reconstruction_threshold: float = 0.6  # share of those shares needed to unmask a dropout
    round_timeout: float = 120.0  # seconds to wait for replies in each exchange
    max_failed_rounds: int = 3  # attempts in a row that may fail (too few replies) before the run stops


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    threads: int = 2

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: an infinite float (privacy.epsilon off) is written as "inf"."""
        return _finite(dataclasses.asdict(self))


def _finite(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    return obj


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {type(values).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"{where + ': ' if where else ''}unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for name, value in values.items():
        typ = hints[name]
        key = f"{where}.{name}" if where else name
        if is_dataclass(typ):
            kwargs[name] = _build(typ, value, key)
            continue
        base = getattr(typ, "__origin__", typ)
        if base is tuple and isinstance(value, list):  # a TOML array, or a JSON list from --set
            value = tuple(value)
        if base is float and isinstance(value, str) and value.strip().lower() in ("inf", "infinity"):
            value = math.inf
        ok = isinstance(value, base) or (base is float and isinstance(value, int) and not isinstance(value, bool))
        if base is int and isinstance(value, bool):
            ok = False
        if not ok:
            kind = "list" if base is tuple else getattr(base, "__name__", base)  # a TOML array or --set [..]
            raise ConfigError(f"{key}: expected {kind}, got {value!r}")
        kwargs[name] = float(value) if base is float else value
    return cls(**kwargs)


def data_columns(cfg: DataConfig) -> dict[str, str]:
    """A purchase file's own names for our columns (ours -> the file's)."""
    return {
        "user": cfg.user_column,
        "item": cfg.item_column,
        "timestamp": cfg.timestamp_column,
        "merchant": cfg.merchant_column,
    }


def validate(cfg: RunConfig) -> RunConfig:
    checks = [
        (cfg.data.dataset in DATASETS, f"data.dataset must be one of {DATASETS}"),
        (cfg.data.dataset != "file" or bool(cfg.data.path), "data.path is required when data.dataset = 'file'"),
        (
            all(c.strip() for c in data_columns(cfg.data).values()) and len(set(data_columns(cfg.data).values())) == 4,
            "data.user_column, data.item_column, data.timestamp_column and data.merchant_column must be four "
            "different non-empty column names",
        ),
        (0 < cfg.data.test_fraction < 1, "data.test_fraction must be in (0, 1)"),
        (0 <= cfg.data.val_fraction < 1, "data.val_fraction must be in [0, 1)"),
        (cfg.data.partition in PARTITIONS, f"data.partition must be one of {PARTITIONS}"),
        (2 <= cfg.data.partition_merchants <= 1000, "data.partition_merchants must be between 2 and 1000"),
        (cfg.data.partition_alpha > 0, "data.partition_alpha must be > 0"),
        (cfg.local.loss in LOSSES, f"local.loss must be one of {LOSSES}"),
        (cfg.data.min_positives >= 1, "data.min_positives must be >= 1"),
        (cfg.threads >= 1, "threads must be >= 1"),
        *(
            (0 <= value < math.inf, f"local.{name} must be a finite number >= 0 (0 freezes what it steps)")
            for name, value in (
                ("lr", cfg.local.lr),
                ("user_lr", cfg.local.user_lr),
                ("bias_lr", cfg.local.bias_lr),
            )
        ),
        (0 <= cfg.local.weight_decay < math.inf, "local.weight_decay must be a finite number >= 0"),
        (cfg.local.prox_mu >= 0, "local.prox_mu must be >= 0"),
        (cfg.local.temperature >= 0, "local.temperature must be > 0, or 0 to choose it on validation"),
        (
            len(cfg.local.temperature_candidates) >= 1
            and all(
                isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0
                for t in cfg.local.temperature_candidates
            ),
            "local.temperature_candidates must be a non-empty list of numbers > 0",
        ),
        (
            cfg.local.temperature > 0 or not cfg.privacy.enabled,
            "local.temperature = 0 chooses it on the validation slice, which customer-level DP does not "
            "account for: with privacy on, set local.temperature (e.g. 1.0)",
        ),
        (cfg.local.user_solve_reg >= 0, "local.user_solve_reg must be >= 0 (0 is off)"),
        (cfg.local.sampled_user_solve_reg >= 0, "local.sampled_user_solve_reg must be >= 0 (0 is off)"),
        (
            all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf")
                for w in cfg.local.sampled_popularity_weights
            ),
            "local.sampled_popularity_weights must be a list of finite numbers >= 0 ([] is off)",
        ),
        (
            not cfg.local.user_solve_reg or cfg.local.loss in ("softmax", "sampled_softmax", "ials"),
            "local.user_solve_reg solves the softmax (full or sampled) or the ials loss: it needs local.loss = "
            "'softmax', 'sampled_softmax' or 'ials'",
        ),
        (cfg.local.ials_alpha >= 0, "local.ials_alpha must be >= 0 (the extra weight of a purchase)"),
        (cfg.local.ials_lr > 0, "local.ials_lr must be > 0"),
        (
            cfg.local.loss != "ials" or cfg.local.temperature > 0,
            "local.temperature = 0 chooses the softmax temperature on validation; the ials loss has none: "
            "set local.temperature = 1",
        ),
        (
            cfg.local.loss != "ials" or cfg.federation.aggregation != "rowwise",
            "local.loss = 'ials' needs federation.aggregation 'fedavg' or 'auto': every merchant's update "
            "reaches every item row",
        ),
        (cfg.local.ials_item_step in ("sgd", "exact"), "local.ials_item_step must be sgd or exact"),
        *(
            (False, why)
            for why in exact_step_problems(
                cfg.model,
                cfg.local,
                cfg.federation,
                counted_bias=cfg.privacy.enabled and cfg.privacy.mechanism == "als" and cfg.privacy.count_share > 0,
            )
        ),
        (cfg.local.epochs >= 1, "local.epochs must be >= 1"),
        (cfg.local.uniform_negatives >= 0, "local.uniform_negatives must be >= 0 (0: in-batch negatives only)"),
        (cfg.local.batch_size >= 1, "local.batch_size must be >= 1"),
        (
            re.fullmatch(r"cpu|cuda(:\d+)?", cfg.local.device) is not None,
            f"local.device must be cpu, cuda or cuda:N, got {cfg.local.device!r}",
        ),
        (
            cfg.local.device == "cpu" or not cfg.privacy.enabled,
            "privacy: customer-level DP runs on local.device = 'cpu' only",
        ),
        (cfg.federation.aggregation in RULES, f"federation.aggregation must be one of {RULES}"),
        (cfg.federation.robust in ROBUST_RULES, f"federation.robust must be one of {ROBUST_RULES}"),
        (0 <= cfg.federation.trim < 0.5, "federation.trim must be in [0, 0.5)"),
        (
            cfg.federation.clip_multiple >= 1,
            "federation.clip_multiple must be >= 1 (norm_clip's and the row_clip rules' bounds, in multiples of "
            "the round's medians)",
        ),
        (
            cfg.federation.sum_clip == 0 or cfg.federation.sum_clip >= 1,
            "federation.sum_clip must be 0 (off) or >= 1 (each row of the round's delta bounded at that many times "
            "the median row)",
        ),
        (
            cfg.federation.sum_clip == 0 or cfg.federation.robust == "none",
            "federation.sum_clip bounds the round's sum; federation.robust bounds each merchant's update: choose one",
        ),
        (
            cfg.federation.robust_groups == 0 or cfg.federation.robust_groups >= MIN_GROUPS,
            f"federation.robust_groups must be 0 (off) or >= {MIN_GROUPS} (a robust rule over fewer group sums "
            "does not bound one spoiled group)",
        ),
        (
            cfg.federation.robust_groups == 0 or cfg.federation.robust != "none",
            "federation.robust_groups groups the merchants for a robust rule: set federation.robust too",
        ),
        (
            cfg.federation.robust == "none" or cfg.federation.aggregation != "rowwise",
            "federation.robust needs federation.aggregation = 'fedavg' or 'auto' (a robust rule reads whole deltas)",
        ),
        (cfg.federation.server.name in SERVER_OPTIMIZERS, f"federation.server.name must be one of {SERVER_OPTIMIZERS}"),
        (0 < cfg.federation.fraction <= 1, "federation.fraction must be in (0, 1]"),
        (cfg.federation.rounds >= 1, "federation.rounds must be >= 1"),
        (cfg.federation.patience >= 0, "federation.patience must be >= 0 (0: never stop early)"),
        (cfg.federation.min_merchants >= 1, "federation.min_merchants must be >= 1"),
        (0 <= cfg.federation.server.lr < math.inf, "federation.server.lr must be a finite number >= 0"),
        (
            0 <= cfg.federation.server.beta1 < 1 and 0 <= cfg.federation.server.beta2 < 1,
            "federation.server.beta1 and beta2 must be in [0, 1)",
        ),
        (0 < cfg.federation.server.tau < math.inf, "federation.server.tau must be a finite number > 0"),
        (cfg.federation.val_every >= 1, "federation.val_every must be >= 1"),
        (cfg.federation.val_customers >= 0, "federation.val_customers must be >= 0 (0: all)"),
        (cfg.federation.val_scope in ("all", "round"), "federation.val_scope must be all or round"),
        # numpy's and torch's generators take it (and the seeds derived from it) as 64-bit unsigned
        (0 <= cfg.federation.seed < 2**32, "federation.seed must be an integer in [0, 2^32)"),
        (cfg.federation.workers >= 1, "federation.workers must be >= 1 (merchants trained at once, in-process)"),
        (
            cfg.federation.upload_precision in PRECISIONS,
            f"federation.upload_precision must be one of {tuple(PRECISIONS)}",
        ),
        *(
            (value >= 1, f"model.{name} must be >= 1")
            for name, value in (
                ("dim", cfg.model.dim),
                ("feature_dim", cfg.model.feature_dim),
                ("hidden", cfg.model.hidden),
                ("hash_buckets", cfg.model.hash_buckets),
            )
        ),
        (0 < cfg.model.init_std < math.inf, "model.init_std must be a finite number > 0"),
        (cfg.model.use_item_id or cfg.model.use_content, "model: enable use_item_id or use_content"),
        (cfg.model.id_rows >= 0, "model.id_rows must be >= 0 (0: one id row per product)"),
        (cfg.model.new_item_neighbours >= 0, "model.new_item_neighbours must be >= 0 (0: every trained product)"),
        (
            all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf")
                for w in cfg.model.content_match_weights
            ),
            "model.content_match_weights must be a list of finite numbers >= 0 ([0] or [] is off)",
        ),
        (cfg.model.content_match_dim >= 1, "model.content_match_dim must be >= 1"),
        (
            all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w < float("inf")
                for w in cfg.model.copurchase_weights
            ),
            "model.copurchase_weights must be a list of finite numbers >= 0 ([0] or [] is off)",
        ),
        (
            len(cfg.model.copurchase_lambdas) > 0
            and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < float("inf")
                for x in cfg.model.copurchase_lambdas
            ),
            "model.copurchase_lambdas must be a non-empty list of finite numbers > 0",
        ),
        (
            all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and 0 <= w <= 1
                for w in cfg.model.served_popularity_weights
            ),
            "model.served_popularity_weights must be a list of numbers in [0, 1] ([] is off: w = 1)",
        ),
        (0 < cfg.model.max_top1_share <= 1, "model.max_top1_share must be in (0, 1]"),
        (cfg.output.index in ("auto", *INDEX_KINDS), f"output.index must be auto or one of {', '.join(INDEX_KINDS)}"),
        (cfg.network.min_merchants >= 1, "network.min_merchants must be >= 1"),
        (
            not cfg.network.secagg or cfg.network.min_merchants >= 3,
            "network.min_merchants must be >= 3 with secagg on (with 2, each learns the other's update from the sum)",
        ),
        (cfg.network.max_weight > 0, "network.max_weight must be > 0"),
        (cfg.network.clipping_range > 0, "network.clipping_range must be > 0"),
        (0 < cfg.network.quantization_range < 2**31, "network.quantization_range must be in (0, 2**31)"),
        (0 < cfg.network.num_shares <= 1, "network.num_shares must be in (0, 1]"),
        (0 < cfg.network.reconstruction_threshold <= 1, "network.reconstruction_threshold must be in (0, 1]"),
        (cfg.network.round_timeout > 0, "network.round_timeout must be > 0"),
        (cfg.network.max_failed_rounds >= 1, "network.max_failed_rounds must be >= 1 (1: stop at the first failure)"),
        (
            not cfg.privacy.enabled or cfg.privacy.mechanism != "dp_sgd" or cfg.local.loss == "softmax",
            "privacy: customer-level DP-SGD is implemented for local.loss = 'softmax' only "
            "(privacy.mechanism = 'als' is the ials loss's)",
        ),
        (
            not cfg.privacy.enabled
            or cfg.privacy.mechanism != "als"
            or (cfg.local.loss == "ials" and cfg.local.ials_item_step == "exact"),
            "privacy.mechanism = 'als' noises ALS's item step: set local.loss = 'ials' and local.ials_item_step = "
            "'exact'",
        ),
        (
            not (cfg.privacy.enabled and cfg.privacy.mechanism == "als")
            or cfg.model.merchant_item_bias == (cfg.privacy.count_share > 0),
            "privacy.mechanism = 'als': a merchant item bias comes from the merchant's noised purchase counts, so "
            "model.merchant_item_bias = true needs privacy.count_share > 0 (e.g. 0.3) and count_share > 0 needs "
            f"the bias (got merchant_item_bias = {str(cfg.model.merchant_item_bias).lower()}, "
            f"count_share = {cfg.privacy.count_share})",
        ),
        (
            not cfg.privacy.enabled or cfg.federation.aggregation != "rowwise",
            "privacy: federation.aggregation must be 'fedavg' or 'auto' (rowwise weights reveal which rows had "
            "purchases, and DP does not noise them)",
        ),
        (
            not (cfg.privacy.enabled and cfg.privacy.noise_split and cfg.privacy.mechanism == "dp_sgd")
            or cfg.federation.server.name != "fedavg",
            "privacy.noise_split: the coordinator takes the round's one DP-SGD step on the noisy sum, so it needs "
            "an adaptive optimiser: set federation.server.name = fedadam (and federation.server.lr, e.g. 0.01)",
        ),
        (
            not (cfg.privacy.enabled and cfg.privacy.noise_split) or cfg.federation.robust == "none",
            "privacy.noise_split: federation.robust reads each merchant's own update, which carries only a share "
            "of the noise; split noise needs the plain sum (robust = none)",
        ),
    ]
    for msg in privacy_errors(cfg.privacy):  # each privacy setting's own range, before the checks that combine them
        raise ConfigError(msg)
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    return _checked_candidates(cfg)


def _checked_candidates(cfg: RunConfig) -> RunConfig:
    """`cfg` with each of `local.candidates` flattened to {"section.key": value} and its values as
    the validated settings hold them (1 -> 1.0 for a float); a candidate whose settings would not
    validate is refused here, naming it, before anything trains. Checked only where they are used
    (local.temperature = 0, which DP and the networked runtime refuse already); elsewhere only
    their form (tables of known settings), so a mistyped list is still named."""
    flats = []
    for i, raw in enumerate(cfg.local.candidates):
        try:
            flats.append(flat_overrides(raw, f"local.candidates[{i}]"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if not flats or cfg.local.temperature != 0:  # a set temperature: nothing is chosen
        return cfg
    base = dataclasses.replace(cfg, local=dataclasses.replace(cfg.local, candidates=()))
    checked = []
    for i, flat in enumerate(flats):
        where = f"local.candidates[{i}]"
        # The exact item step's limits depend partly on the run (its federation, its item bias), so
        # a candidate that asks for it is validated as the SGD step here and skipped when the run
        # starts if the run cannot give it (`candidates.unsupported`): a file run with a merchant
        # item bias still chooses among the other candidates. What the candidate's own settings
        # break (it asks for the exact step and an item bias, say) no run can give: refused here.
        exact = flat.get("local.ials_item_step") == "exact"
        try:
            one = with_overrides(base, {**flat, "local.ials_item_step": "sgd"} if exact else flat)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if exact:
            exact_local = dataclasses.replace(one.local, ials_item_step="exact")
            own = exact_step_problems(one.model, exact_local, one.federation, set_keys=flat.keys())
            if own:
                raise ConfigError(f"{where}: {own[0]}")
        if one.local.temperature == 0:
            raise ConfigError(f"{where}: local.temperature = 0 inside a candidate; give each one a temperature > 0")
        section = {"model": one.model, "local": one.local}
        values = {k: getattr(section[k.split(".")[0]], k.split(".")[1]) for k in flat}
        checked.append({**values, "local.ials_item_step": "exact"} if exact else values)
    return dataclasses.replace(cfg, local=dataclasses.replace(cfg.local, candidates=tuple(checked)))


def aggregation_rule(cfg: RunConfig, n_items: int) -> str:
    """The aggregation rule a run over `n_items` products uses (`federation.aggregation` = auto
    resolved): both runtimes and the model card call this, so they always agree."""
    shapes = item_tower_shapes(n_items, cfg.model)
    fed, local = cfg.federation, cfg.local
    return resolve_rule(fed.aggregation, shapes, cfg.privacy.enabled, fed.robust, local.loss, local.ials_item_step)


def check_networked(cfg: RunConfig) -> RunConfig:
    """Settings the networked runtime cannot honour; checked before `flwr run` launches and again in the
    ServerApp, so a run never starts only to fail (or silently differ) on the coordinator."""
    if cfg.federation.upload_precision != "float32":  # SecAgg+ quantises to its own range
        raise ConfigError("federation.upload_precision: the networked runtime sends float32 only")
    fed = cfg.federation
    if fed.robust != "none" and not fed.robust_groups:  # it would read every merchant's own delta: not a sum
        raise ConfigError(
            "federation.robust: the networked runtime aggregates sums only; a robust rule runs there over the "
            "sums of random groups of merchants (federation.robust_groups >= 3)"
        )
    if fed.robust_groups and cfg.network.min_merchants < MIN_GROUP * fed.robust_groups:
        raise ConfigError(
            f"federation.robust_groups = {fed.robust_groups} needs network.min_merchants >= "
            f"{MIN_GROUP * fed.robust_groups} ({MIN_GROUP} merchants a group), so that no round starts that cannot "
            "fill its groups"
        )
    if cfg.local.temperature == 0:
        raise ConfigError(
            "local.temperature = 0 (settings chosen on validation among local.candidates, or the temperatures) runs "
            "in-process only: set a temperature, and the other settings of the candidate you want (a merchant can "
            "choose on its own file alone: `fedrec train --dataset file` prints the choice)"
        )
    if any(w > 0 for w in cfg.model.copurchase_weights) and not cfg.privacy.enabled:
        raise ConfigError(
            "model.copurchase_weights: the co-purchase term runs in-process only (its item-item Gram has no "
            "message in the networked runtime); set model.copurchase_weights = [] for a networked run"
        )
    dp_als = cfg.privacy.enabled and cfg.privacy.mechanism == "als"  # its sums are bounded: clipped vectors
    if cfg.local.ials_item_step == "exact" and not dp_als:  # sums of u u' over customers: no bound the config fixes
        raise ConfigError(
            "local.ials_item_step = 'exact' runs in-process only without DP: its terms (sums of u u' over customers) "
            "have no public bound to scale into SecAgg+'s fixed range; use local.ials_item_step = 'sgd' (or DP-ALS, "
            "privacy.mechanism = 'als', whose clipped sums have one)"
        )
    split = cfg.privacy.noise_split if cfg.privacy.enabled else 0
    if split and not cfg.network.secagg:  # split noise protects only a sum nobody can take apart
        raise ConfigError("privacy.noise_split needs network.secagg = true: without it each share is sent in the clear")
    if split > cfg.network.min_merchants:
        raise ConfigError(
            f"privacy.noise_split = {split} needs network.min_merchants >= {split}: a round summed over fewer "
            "merchants would carry less than the certified noise"
        )
    return cfg


def config_from_dict(raw: dict[str, Any]) -> RunConfig:
    """Rebuild a RunConfig saved with `to_dict()` (e.g. in a checkpoint)."""
    return validate(_build(RunConfig, raw, ""))


def parse_sets(items: list[str] | tuple[str, ...] | None) -> dict[str, Any]:
    """`--set KEY=VALUE` overrides: VALUE as JSON (numbers, true/false, lists), else as a string."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. federation.rounds=20")
        key, value = (part.strip() for part in item.split("=", 1))
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _set_dotted(raw: dict[str, Any], overrides: dict[str, Any] | None) -> None:
    """Apply {"section.key": value} overrides to a raw config dict, in place."""
    for dotted, value in (overrides or {}).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for i, part in enumerate(parents):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                section = ".".join(parents[: i + 1])
                raise ConfigError(f"{dotted}: {section} is a table of settings, but it was given the value {node!r}")
        node[leaf] = value


def with_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """A validated copy of `cfg` with {"section.key": value} overrides, as `load_config` applies them."""
    raw = cfg.to_dict()
    _set_dotted(raw, _finite(overrides))
    return config_from_dict(raw)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the file (TOML or YAML), then `overrides` ({"data.dataset": ...})."""
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            if p.suffix.lower() == ".toml":
                raw = tomllib.loads(p.read_text(encoding="utf-8"))
            elif p.suffix.lower() in (".yaml", ".yml"):
                raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
            else:
                raise ConfigError(f"{p}: config must be .toml, .yaml or .yml")
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{p}: cannot parse ({exc})") from exc
    from_file = copy.deepcopy(raw)
    _set_dotted(raw, overrides)
    try:
        return validate(_build(RunConfig, raw, ""))
    except ConfigError as exc:
        raise ConfigError(f"{_blamed(path, from_file, overrides, exc)}: {exc}") from None


def _blamed(
    path: str | Path | None, from_file: dict[str, Any], overrides: dict[str, Any] | None, exc: ConfigError
) -> str:
    """Where a config problem comes from: the file (or the defaults) when it has it without the
    overrides, else the overrides (`--set` and the options on the command line), so that a mistyped
    `--set` is not reported as a mistake in a file the user never edited."""
    where = str(path) if path else "config"
    if not overrides:
        return where
    try:
        validate(_build(RunConfig, from_file, ""))
    except ConfigError as alone:
        if str(alone) == str(exc):
            return where
    return f"the command line's settings (over {where})" if path else "the command line's settings"
