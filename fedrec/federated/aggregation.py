"""Aggregation rules: combine merchants' item-tower deltas into one pseudo-gradient.

fedavg: sum_k (n_k / n) * delta_k for every tensor (McMahan et al., 2017).
rowwise: the same for dense tensors; for the item-id table, row i is averaged only over the
merchants that touched item i (weights n_k restricted to them), so a merchant that never
sold an item does not drag that item's row towards zero. Rows no sampled merchant touched
fall back to plain fedavg.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedrec.federated.messages import ItemTowerUpdate

AGGREGATIONS = ("fedavg", "rowwise")
ROW_TENSORS = ("item_emb.weight",)


def fedavg(updates: Sequence[ItemTowerUpdate]) -> dict[str, torch.Tensor]:
    if not updates:
        raise ValueError("no updates to aggregate")
    n = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    w = (n / n.sum()).float()
    return {
        name: torch.einsum("k,k...->...", w, torch.stack([u.delta[name] for u in updates])) for name in updates[0].delta
    }


def rowwise_fedavg(
    updates: Sequence[ItemTowerUpdate], row_tensors: Sequence[str] = ROW_TENSORS
) -> dict[str, torch.Tensor]:
    out = fedavg(updates)
    n = torch.tensor([u.num_examples for u in updates], dtype=torch.float64)
    mask = torch.stack([u.touched_rows for u in updates]).double()  # [K, items]
    w = mask * n[:, None]
    denom = w.sum(0)
    touched_any = denom > 0
    w = (w / denom.clamp_min(1e-12)).float()  # [K, items], columns sum to 1 where touched
    for name in row_tensors:
        stacked = torch.stack([u.delta[name] for u in updates])  # [K, items, dim]
        row_avg = torch.einsum("ki,kid->id", w, stacked)
        out[name] = torch.where(touched_any[:, None], row_avg, out[name])
    return out


def aggregate(updates: Sequence[ItemTowerUpdate], rule: str) -> dict[str, torch.Tensor]:
    if rule == "fedavg":
        return fedavg(updates)
    if rule == "rowwise":
        return rowwise_fedavg(updates)
    raise ValueError(f"unknown aggregation {rule!r}; choose one of {AGGREGATIONS}")
