"""The merchant's private step (DP-SGD at the customer level), as pure functions.

Per step: customers join the batch by Poisson sampling (the accountant's assumption); each
sampled customer's gradient of the shared parameters (the item tower, and the merchant's item
bias, which other customers' recommendations also read) is computed on their own purchases
alone (in closed form, `fedrec.privacy.closed_form`, or by torch.func per-sample gradients here
for the towers it does not cover), clipped to L2 norm `clip`, summed, and Gaussian noise
of standard deviation `noise_multiplier * clip` is added, all inside the merchant. The customer's
own user vector is trained on their own purchases only and never leaves the merchant, so its
gradient is used as is.

With the noise split across merchants (`privacy.noise_split`), the same clipped sum is taken once
a round and each merchant adds only its share of the noise (`DPMechanism.share_std`); the
secure sum over merchants then carries the whole of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, vmap

from fedrec.privacy.accountant import DPMechanism

CHUNK = 64  # customers per vmap call: bounds the memory of the per-customer gradients


def poisson_sample(n_customers: int, rate: float, gen: torch.Generator) -> torch.Tensor:
    """Indices of the customers in this step's batch: each independently with probability `rate`."""
    return torch.nonzero(torch.rand(n_customers, generator=gen) < rate).ravel()


def padded_baskets(
    indptr: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each customer's training purchases as one padded row (items, mask), without Python loops."""
    starts, ends = indptr[rows], indptr[rows + 1]
    lengths = ends - starts
    width = max(1, int(lengths.max())) if len(rows) else 1
    offsets = torch.arange(width)
    mask = offsets[None, :] < lengths[:, None]
    pos = torch.where(mask, starts[:, None] + offsets[None, :], torch.zeros_like(mask, dtype=torch.long))
    return indices[pos] * mask, mask


def clip_and_sum(per_customer: dict[str, torch.Tensor], clip: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each customer's gradient (all shared tensors together) to L2 norm <= clip, then sum.

    Returns the sums and each customer's norm before clipping.
    """
    first = next(iter(per_customer.values()))
    sq = torch.zeros(first.shape[0], dtype=first.dtype)
    for g in per_customer.values():
        sq = sq + g.flatten(1).pow(2).sum(1)
    norms = sq.sqrt()
    factor = (clip / (norms + 1e-12)).clamp(max=1.0)
    sums = {k: torch.tensordot(factor, g, dims=1) for k, g in per_customer.items()}
    return sums, norms


def add_noise(
    sums: dict[str, torch.Tensor], mech: DPMechanism, gen: torch.Generator, std: float | None = None
) -> dict[str, torch.Tensor]:
    """The Gaussian mechanism: N(0, (noise_multiplier * clip)^2) on every coordinate, or N(0, std^2)
    for one merchant's share of it (`DPMechanism.share_std`)."""
    std = mech.noise_multiplier * mech.clip if std is None else std
    return {k: s + std * torch.randn(s.shape, generator=gen, dtype=s.dtype) for k, s in sums.items()}


CustomerLoss = Callable[[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def clipped_gradient_sums(
    shared: dict[str, torch.Tensor],
    customer_loss: CustomerLoss,
    users: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-customer gradients by vmap, clipped and summed: (sums, user grads, norms before clipping)."""
    per_grad = vmap(grad(customer_loss, argnums=(0, 1)), in_dims=(None, 0, 0, 0))
    sums = {k: torch.zeros_like(v) for k, v in shared.items()}
    user_grads, norms = [users.new_zeros((0, users.shape[1]))], [users.new_zeros(0)]
    for start in range(0, len(users), CHUNK):
        sl = slice(start, start + CHUNK)
        g_shared, g_users = per_grad(shared, users[sl], pos[sl], mask[sl])
        part, n = clip_and_sum(g_shared, clip)
        for k in sums:
            sums[k] += part[k]
        user_grads.append(g_users)
        norms.append(n)
    return sums, torch.cat(user_grads), torch.cat(norms)


def noisy_mean(
    sums: dict[str, torch.Tensor], mech: DPMechanism, expected_batch: float, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """(sum of clipped gradients + noise) / expected batch size: the usual estimate under Poisson sampling."""
    return {k: v / expected_batch for k, v in add_noise(sums, mech, gen).items()}
