"""Setting sets chosen between on the validation slice (`local.candidates`).

A new shop's file says which model suits it only on its own validation slice: dense data wants a
low softmax temperature, sparse data a high one, and on a sparse file without product metadata
implicit ALS's weighted squares at a small dimension beat every softmax (README, "A new shop's
file"). So a run may list whole setting sets; with `local.temperature = 0` (choose on validation),
`simulation.run_federated` trains each once, early stopped on train alone, keeps the best
validation recall@20, and refits it.

A candidate changes `local.*` settings and the tower's parts and sizes only: the features, the data
and the federation stay the run's own, so every candidate is scored on the same customers and rounds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedrec.federated.ials_item_step import exact_step_problems
from fedrec.federated.local import LocalConfig, catalogue_refuses
from fedrec.model import ModelConfig, id_table_rows

if TYPE_CHECKING:
    from fedrec.federated.simulation import FederationConfig

# What a candidate may set: the tower's parts and sizes, and whether each merchant keeps a private
# item bias (it never travels: the shared tower is the same either way). Not the features
# (model.hash_buckets), built once per run, nor the id table's layout or the served new-product
# rule (id_rows, new_item_neighbours), nor the choice itself (local.candidates,
# temperature_candidates), nor where it runs (local.device).
MODEL_KEYS = ("dim", "feature_dim", "hidden", "init_std", "use_item_id", "use_content", "merchant_item_bias")
LOCAL_KEYS = tuple(
    f.name for f in dataclasses.fields(LocalConfig) if f.name not in ("candidates", "temperature_candidates", "device")
)


@dataclass(frozen=True)
class Candidate:
    label: str  # "local.loss=ials, model.dim=16"; a temperature candidate: the temperature ("0.5")
    model: ModelConfig
    local: LocalConfig


def flat_overrides(raw: Mapping[str, Any], where: str = "candidate") -> dict[str, Any]:
    """{"local": {"loss": "ials"}} (a TOML table with dotted keys) or {"local.loss": "ials"} (JSON
    from --set) as {"local.loss": "ials"}; a key outside `MODEL_KEYS` and `LOCAL_KEYS` is an error."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a table of settings, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, Mapping):
            out.update(flat_overrides({f"{key}.{k}": v for k, v in value.items()}, where))
        else:
            out[str(key)] = value
    for key in out:
        section, _, name = key.partition(".")
        allowed = {"model": MODEL_KEYS, "local": LOCAL_KEYS}.get(section, ())
        if name not in allowed:
            raise ValueError(
                f"{where}: {key} cannot differ between candidates; a candidate sets "
                + ", ".join([*(f"model.{k}" for k in MODEL_KEYS), "local.<setting>"])
            )
    if not out:
        raise ValueError(f"{where}: an empty candidate (give it at least one setting)")
    return out


def label_of(overrides: Mapping[str, Any]) -> str:
    """A label like "local.loss=ials, model.use_content=false": the overrides as --set takes them."""
    return ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items())


def apply(model_cfg: ModelConfig, local_cfg: LocalConfig, overrides: Mapping[str, Any]) -> Candidate:
    """The run's settings with one candidate's overrides (already checked by the config)."""
    model = {k.removeprefix("model."): v for k, v in overrides.items() if k.startswith("model.")}
    local = {k.removeprefix("local."): v for k, v in overrides.items() if k.startswith("local.")}
    return Candidate(
        label_of(overrides),
        dataclasses.replace(model_cfg, **model),
        dataclasses.replace(local_cfg, candidates=(), **local),
    )


def candidates_of(model_cfg: ModelConfig, local_cfg: LocalConfig) -> list[Candidate]:
    """With `local.temperature` = 0, the run's candidates: `local.candidates`, else one per
    `temperature_candidates`. Empty (nothing to choose) with a temperature set: setting one, as
    `--set local.temperature=0.5` does, fixes the settings whatever candidates the config lists."""
    if local_cfg.temperature != 0:
        return []
    if local_cfg.candidates:
        return [apply(model_cfg, local_cfg, flat_overrides(c)) for c in local_cfg.candidates]
    temps = [float(t) for t in local_cfg.temperature_candidates]
    return [Candidate(str(t), model_cfg, dataclasses.replace(local_cfg, temperature=t)) for t in temps]


def unsupported(candidate: Candidate, n_items: int, fed: FederationConfig) -> str | None:
    """Why a candidate cannot train on this catalogue or under this federation (the run skips it),
    else None. The config refuses such a candidate for its own federation; a run that changes the
    federation (an ablation of `make evaluate`) may still list it."""
    problems = exact_step_problems(candidate.model, candidate.local, fed)
    if candidate.local.ials_item_step == "exact" and id_table_rows(n_items, candidate.model):
        problems.insert(
            0,
            f"local.ials_item_step = 'exact' solves one id row per product: {n_items} products exceed 2 x "
            f"model.id_rows ({candidate.model.id_rows}); set model.id_rows = 0",
        )
    return catalogue_refuses(candidate.local, n_items) or (problems[0] if problems else None)
