"""Aggregation rules: combine merchants' item-tower deltas into one pseudo-gradient.

fedavg: sum_k (n_k / n) * delta_k for every tensor (McMahan et al., 2017).
rowwise: the same for dense tensors; for the item-id table, row i is averaged only over the
merchants that touched item i (weights n_k restricted to them), so a merchant that never
sold an item does not drag that item's row towards zero. Rows no sampled merchant touched
fall back to plain fedavg.
normalize_steps (FedNova, Wang et al., 2020): a merchant with more data takes more local steps
and so returns a longer delta; weighting that delta by n_k again counts it twice (weight ~ n_k^2),
and small merchants all but vanish. FedNova averages the per-step deltas delta_k / tau_k with the
same weights and rescales by the weighted mean step count tau_eff = sum_k w_k tau_k, which makes
each merchant's pull proportional to n_k, as in centralized training.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedrec.federated.messages import ItemTowerUpdate

AGGREGATIONS = ("fedavg", "rowwise")
ROW_TENSORS = ("item_emb.weight",)


def example_weights(updates: Sequence[ItemTowerUpdate]) -> torch.Tensor:
    """n_k / n, shape [K]."""
    if not updates:
        raise ValueError("no updates to aggregate")
    n = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    return (n / n.sum()).float()


def row_weights(updates: Sequence[ItemTowerUpdate]) -> torch.Tensor:
    """Per-row weights [K, items]: n_k over the merchants that touched the row (fedavg where none did)."""
    n = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    w = torch.stack([u.touched_rows for u in updates]).double() * n[:, None]
    denom = w.sum(0)
    w = (w / denom.clamp_min(1e-12)).float()
    w[:, denom == 0] = example_weights(updates)[:, None]
    return w


def weighted_sum(
    updates: Sequence[ItemTowerUpdate], weights: dict[str, torch.Tensor], normalize_steps: bool = False
) -> dict[str, torch.Tensor]:
    """sum_k w_k delta_k per tensor; w_k is [K] (whole tensor) or [K, rows] (per leading row)."""
    dense = example_weights(updates)
    tau = torch.tensor([u.num_steps for u in updates], dtype=torch.float32)
    out = {}
    for name in updates[0].delta:
        stacked = torch.stack([u.delta[name] for u in updates])  # [K, ...]
        w = weights.get(name, dense)
        extra = (1,) * (stacked.dim() - w.dim())
        if normalize_steps:
            tau_eff = (w * tau.reshape(-1, *(1,) * (w.dim() - 1))).sum(0)  # [] or [rows]
            per_step = stacked / tau.reshape(-1, *(1,) * (stacked.dim() - 1))
            out[name] = (w.reshape(*w.shape, *extra) * per_step).sum(0) * tau_eff.reshape(*tau_eff.shape, *extra)
        else:
            out[name] = (w.reshape(*w.shape, *extra) * stacked).sum(0)
    return out


def fedavg(updates: Sequence[ItemTowerUpdate], normalize_steps: bool = False) -> dict[str, torch.Tensor]:
    return weighted_sum(updates, {}, normalize_steps)


def rowwise_fedavg(
    updates: Sequence[ItemTowerUpdate], row_tensors: Sequence[str] = ROW_TENSORS, normalize_steps: bool = False
) -> dict[str, torch.Tensor]:
    rows = row_weights(updates)
    return weighted_sum(updates, {name: rows for name in row_tensors}, normalize_steps)


def aggregate(updates: Sequence[ItemTowerUpdate], rule: str, normalize_steps: bool = False) -> dict[str, torch.Tensor]:
    if rule == "fedavg":
        return fedavg(updates, normalize_steps)
    if rule == "rowwise":
        return rowwise_fedavg(updates, normalize_steps=normalize_steps)
    raise ValueError(f"unknown aggregation {rule!r}; choose one of {AGGREGATIONS}")
