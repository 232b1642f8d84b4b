"""The only thing a merchant sends: an item-tower update.

The type has no field that could carry user embeddings or user ids, and its constructor
rejects any tensor name or shape outside the item tower, so a leak is a type error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ItemTowerUpdate:
    """A merchant's contribution to one round.

    delta: new minus received value of every item-tower tensor.
    num_examples: training positives used (n_k in FedAvg).
    touched_rows: bool per catalogue item, True where the merchant had a training positive:
    row-wise averaging of the item-id table only averages over merchants that saw the item.
    num_steps: local optimiser steps behind `delta` (tau_k, for FedNova's normalisation).
    """

    delta: Mapping[str, torch.Tensor]
    num_examples: int
    touched_rows: torch.Tensor
    num_steps: int = 1

    def validate(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        if set(self.delta) != set(shapes):
            extra = sorted(set(self.delta) - set(shapes))
            missing = sorted(set(shapes) - set(self.delta))
            raise ValueError(f"update must carry exactly the item tower: extra={extra} missing={missing}")
        for name, t in self.delta.items():
            if tuple(t.shape) != tuple(shapes[name]):
                raise ValueError(f"update tensor {name} has shape {tuple(t.shape)}, want {shapes[name]}")
        n_items = shapes["item_emb.weight"][0]
        if self.touched_rows.dtype != torch.bool or tuple(self.touched_rows.shape) != (n_items,):
            raise ValueError("touched_rows must be a bool tensor with one entry per catalogue item")
        if self.num_examples <= 0:
            raise ValueError("num_examples must be positive")
        if self.num_steps <= 0:
            raise ValueError("num_steps must be positive")
