"""A row bound on the round's aggregate: the one bound secure aggregation leaves the coordinator.

Under SecAgg+ the coordinator decodes only the sum over a round's merchants, so it cannot bound one
merchant's update (the rules of `robust.py` read each). It can bound the aggregate. Each row of
each tensor of the round's delta (one product's id vector, one token's vector, one unit's weights)
is scaled down to at most `multiple` times the median norm of that tensor's moving rows this
round. A promotion attack moves one product's row far more than the round moves a typical row, so
that row is cut back. So is an honest row that moved far (a product that sold much this round);
and an attacker still gets the bound's worth of push every round (measured: README, "Attacks").

Post-processing of the aggregate: it changes no merchant's message, keeps any DP guarantee, and
both runtimes apply it where they turn the sums into the round's delta (`delta_from_sums`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def clip_rows_of_sum(delta: Mapping[str, torch.Tensor], multiple: float) -> dict[str, torch.Tensor]:
    """`delta` with every row of each 2-D tensor at most `multiple` times the median norm of that
    tensor's nonzero rows (rows nobody moved, such as token rows the catalogue does not use, do not
    drag the median to 0). 1-D tensors (a layer's biases: one row) pass unchanged."""
    if multiple <= 0:
        raise ValueError(f"multiple must be > 0, got {multiple}")
    out = {}
    for name, v in delta.items():
        if v.dim() < 2:
            out[name] = v
            continue
        norms = v.double().flatten(1).norm(dim=1)
        moving = norms[norms > 0]
        if len(moving) == 0:
            out[name] = v
            continue
        bound = multiple * moving.median()
        scale = torch.clamp(bound / norms.clamp_min(1e-300), max=1.0)
        out[name] = (v.double() * scale.reshape(-1, *(1,) * (v.dim() - 1))).to(v.dtype)
    return out
