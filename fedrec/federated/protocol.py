"""What travels in the networked runtime, derived from the run config alone (both sides agree).

Coordinator -> merchant: the item tower as arrays in `item_tower_shapes` order, the stage and
the round. Merchant -> coordinator: the stage's sums in the `wire.WireFormat` of `stage_format`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedrec.config import RunConfig, aggregation_rule
from fedrec.federated import content_choice, popularity_prior
from fedrec.federated.aggregation import sum_names
from fedrec.federated.wire import WireFormat, max_local_steps, metric_names, validation_names, wire_format
from fedrec.metrics import METRICS
from fedrec.model import ModelConfig, item_tower_shapes
from fedrec.privacy.accountant import steps_per_epoch

# "refit": a train round of the refit on train + validation (`federation.refit`), same reply;
# "buyers" and "prior": a large catalogue's popularity prior (its counts, then each candidate
# weight's validation sums; `fedrec/federated/popularity_prior.py`); "content": the content match's
# candidate weights' validation sums (`fedrec/federated/content_choice.py`)
STAGES = ("train", "validate", "refit", "buyers", "prior", "content", "finish")


def stage_format(stage: str, n_items: int, cfg: RunConfig) -> WireFormat:
    """The names, shapes and public scales of a merchant's reply in `stage`."""
    if stage in ("train", "refit"):
        expected = sum_names(item_tower_shapes(n_items, cfg.model), aggregation_rule(cfg, n_items))
        expected.update(validation_names())
    elif stage == "validate":
        expected = validation_names()
    elif stage == "finish":
        expected = metric_names(METRICS)
    elif stage == "buyers":
        expected = popularity_prior.buyer_names(n_items)
    elif stage == "prior":
        expected = popularity_prior.candidate_names(cfg.local.sampled_popularity_weights)
    elif stage == "content":
        expected = content_choice.candidate_names(cfg.model.content_match_weights)
    else:
        raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
    if cfg.privacy.enabled and cfg.privacy.mechanism == "als":  # weight 1, one step, bounded item-step sums
        return wire_format(expected, cfg.network.max_weight, 1.0, train_weight=1.0, dp_als_clip=cfg.privacy.clip)
    if cfg.privacy.enabled and cfg.privacy.noise_split:
        # One step a round: the delta is a clipped-gradient sum over the sampled customers. Scaled so
        # that clip x (the expected batch of a max_weight-customer shop) fits the range: only a batch
        # whose every gradient lay on one coordinate could exceed it, and that is refused, not clipped.
        bound = cfg.privacy.clip * cfg.privacy.sample_rate * cfg.network.max_weight
        return wire_format(
            expected, cfg.network.max_weight, 1.0, train_weight=max(1.0, bound / cfg.network.clipping_range)
        )
    if cfg.privacy.enabled:  # weight 1 and a fixed schedule of steps (fedrec/privacy)
        steps = float(cfg.local.epochs * steps_per_epoch(cfg.privacy.sample_rate))
        return wire_format(expected, cfg.network.max_weight, steps, train_weight=1.0)
    steps = max_local_steps(cfg.network.max_weight, cfg.local.batch_size, cfg.local.epochs)
    return wire_format(expected, cfg.network.max_weight, steps)


def state_to_arrays(state: dict[str, torch.Tensor]) -> list[np.ndarray]:
    return [state[k].detach().numpy().astype(np.float32) for k in state]


def state_and_extra(
    arrays: Sequence[np.ndarray], n_items: int, model: ModelConfig
) -> tuple[dict[str, torch.Tensor], list[np.ndarray]]:
    """The item tower, then any arrays the stage sends after it (the prior's pooled counts, or the
    content match's basis)."""
    k = len(item_tower_shapes(n_items, model))
    return state_from_arrays(arrays[:k], n_items, model), [np.asarray(a, dtype=np.float64) for a in arrays[k:]]


def state_from_arrays(arrays: Sequence[np.ndarray], n_items: int, model: ModelConfig) -> dict[str, torch.Tensor]:
    """The received item tower; refuses arrays that do not match the configured model."""
    shapes = item_tower_shapes(n_items, model)
    if len(arrays) != len(shapes):
        raise ValueError(f"received {len(arrays)} item-tower arrays, the model has {len(shapes)}")
    out = {}
    for (name, shape), arr in zip(shapes.items(), arrays, strict=True):
        if tuple(arr.shape) != tuple(shape):
            raise ValueError(f"received {name} with shape {tuple(arr.shape)}, want {tuple(shape)}")
        out[name] = torch.from_numpy(np.array(arr, dtype=np.float32))
    return out
