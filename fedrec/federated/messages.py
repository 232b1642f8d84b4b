"""The only thing a merchant sends: its terms of the round's sums (`MerchantSums`).

Every tensor is pre-weighted (see fedrec/federated/aggregation.py), so the coordinator needs only
the sum over merchants, which secure aggregation can compute without showing any one term. The type
has no field that could carry user embeddings or user ids, and `validate` rejects any name or shape
outside the whitelist of the round's rule, and any NaN or infinite value, before the message
enters a sum.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MerchantSums:
    """tensors: name -> float32 tensor; names and shapes as `aggregation.sum_names` lists them."""

    tensors: Mapping[str, torch.Tensor]

    def validate(self, expected: Mapping[str, tuple[int, ...]]) -> None:
        if set(self.tensors) != set(expected):
            extra = sorted(set(self.tensors) - set(expected))
            missing = sorted(set(expected) - set(self.tensors))
            raise ValueError(f"message must carry exactly the round's sums: extra={extra} missing={missing}")
        for name, t in self.tensors.items():
            if not isinstance(t, torch.Tensor) or t.dtype != torch.float32:
                raise ValueError(f"message tensor {name} must be a float32 tensor, got {getattr(t, 'dtype', type(t))}")
            if tuple(t.shape) != tuple(expected[name]):
                raise ValueError(f"message tensor {name} has shape {tuple(t.shape)}, want {tuple(expected[name])}")
            # A finite sum implies finite terms (a NaN or infinity propagates), and costs no mask.
            if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
                raise ValueError(f"message tensor {name} holds NaN or infinite values")
