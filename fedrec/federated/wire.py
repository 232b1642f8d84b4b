"""A merchant's sums on the wire: a fixed list of float arrays, each divided by a public scale.

Secure aggregation (SecAgg+) adds integers, so every value is clipped to [-clip, clip] and
quantised before masking. Raw sums do not fit such a range (n_k counts purchases, n_k * tau_k
grows with the square of a shop's size), so each tensor is divided by a scale that everyone knows
in advance (from the run config, never from one merchant's data) and the coordinator multiplies
the total back. Division by a constant commutes with the sum, so the coordinator's sums-by-sums
rule gives the same result; only the quantisation step (2 * clip / quantization_range, per
merchant) is added. A value outside the range is an error at the merchant, never a silent clip.
The same encoding runs with and without SecAgg, so the two runtimes differ only in who adds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedrec.federated.aggregation import LOSS, ROW_STEPS, STEPS
from fedrec.privacy import noisy_als

VAL_HITS, VAL_USERS = "val/recall@20", "val/users"
TEST_PREFIX, TEST_USERS = "test/", "test/users"
LOSS_BOUND = 64.0  # public bound on a merchant's mean training loss (softmax: log(items) + decay)


@dataclass(frozen=True)
class WireFormat:
    """The ordered names and shapes of a message, and each tensor's public scale."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    scales: tuple[float, ...]

    @property
    def expected(self) -> dict[str, tuple[int, ...]]:
        return dict(zip(self.names, self.shapes, strict=True))


def public_scale(
    name: str, max_weight: float, max_steps: float, train_weight: float | None = None, dp_als_clip: float = 0.0
) -> float:
    """The divisor of one tensor: bounds that follow from the config alone.

    max_weight bounds n_k (a merchant's training purchases); max_steps bounds tau_k. A delta is
    weighted by n_k (or n_k / tau_k), so it is divided by max_weight like n_k itself.
    `train_weight` replaces max_weight for the training sums when the weight is a public
    constant (1 under differential privacy): dividing a weight-1 delta by max_weight would lose
    it to the quantisation step. Metric sums (a sum over customers) keep max_weight.
    DP-ALS's sums (`dp_als_clip`, its privacy.clip) add one clipped vector, or its outer product,
    per customer with purchases, so at most max_weight of them: max_weight x clip (per-product
    sums, each purchase weighted at most 1) and max_weight x clip^2 (the Gram); the noise is far
    below either.
    """
    if name == noisy_als.RHS and dp_als_clip:
        return max_weight * dp_als_clip
    if name == noisy_als.GRAM and dp_als_clip:
        return max_weight * dp_als_clip**2
    if train_weight is not None and not name.startswith(("val/", "test/")):
        max_weight = train_weight
    if name in (STEPS, ROW_STEPS):
        return max_weight * max_steps
    if name == LOSS:
        return max_weight * LOSS_BOUND
    return max_weight  # n, rows/n, deltas, metric sums (a sum over at most n_k customers)


def wire_format(
    expected: Mapping[str, tuple[int, ...]],
    max_weight: float,
    max_steps: float,
    train_weight: float | None = None,
    dp_als_clip: float = 0.0,
) -> WireFormat:
    names = tuple(sorted(expected))
    return WireFormat(
        names,
        tuple(tuple(expected[n]) for n in names),
        tuple(public_scale(n, max_weight, max_steps, train_weight, dp_als_clip) for n in names),
    )


def max_local_steps(max_weight: float, batch_size: int, epochs: int) -> float:
    return float(math.ceil(max_weight / batch_size) * epochs)


def to_wire(sums: Mapping[str, torch.Tensor], fmt: WireFormat, clip: float) -> list[np.ndarray]:
    """Merchant side: scaled float32 arrays in the format's order; refuses values beyond +-clip."""
    if set(sums) != set(fmt.names):
        raise ValueError(f"sums do not match the wire format: {sorted(set(sums) ^ set(fmt.names))}")
    out = []
    for name, scale in zip(fmt.names, fmt.scales, strict=True):
        # Scalars travel as shape (1,): SecAgg+'s masks are made per array shape, and 0-d arrays
        # come back wrong (measured: a 0-d sum decoded to garbage while 1-d sums were exact).
        arr = (sums[name].detach().double() / scale).numpy().astype(np.float32).reshape(wire_shape(fmt.expected[name]))
        peak = float(np.abs(arr).max()) if arr.size else 0.0
        if not np.isfinite(peak):
            raise ValueError(f"{name}: NaN or infinite value, not sent")
        if peak > clip:
            raise ValueError(
                f"{name}: scaled value {peak:.3g} is outside the secure-aggregation range +-{clip}; "
                "raise network.max_weight (a public bound on any merchant's training purchases)"
            )
        out.append(arr)
    return out


def wire_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape) or (1,)


def check_arrays(arrays: Sequence[np.ndarray], fmt: WireFormat) -> None:
    """Coordinator side, wherever it can see one message: count, shape, dtype, finiteness."""
    if len(arrays) != len(fmt.names):
        raise ValueError(f"expected {len(fmt.names)} arrays, got {len(arrays)}")
    for arr, name, shape in zip(arrays, fmt.names, fmt.shapes, strict=True):
        if arr.dtype != np.float32:
            raise ValueError(f"{name}: dtype {arr.dtype}, want float32")
        if tuple(arr.shape) != wire_shape(shape):
            raise ValueError(f"{name}: shape {tuple(arr.shape)}, want {wire_shape(shape)}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{name}: NaN or infinite values")


def from_wire(total: Sequence[np.ndarray], fmt: WireFormat) -> dict[str, torch.Tensor]:
    """Coordinator side: the summed arrays back in the units of `aggregation.merchant_sums`."""
    return {
        name: torch.as_tensor(np.asarray(arr, dtype=np.float64) * scale).float().reshape(shape)
        for arr, name, shape, scale in zip(total, fmt.names, fmt.shapes, fmt.scales, strict=True)
    }


def sum_arrays(messages: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Plaintext runtime: the coordinator adds the messages itself (in float64)."""
    if not messages:
        raise ValueError("no messages to add")
    total = [np.asarray(a, dtype=np.float64).copy() for a in messages[0]]
    for msg in messages[1:]:
        for t, a in zip(total, msg, strict=True):
            t += a
    return total


def metric_names(prefix_metrics: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Test-metric sums (one scalar each, plus the count of customers behind them)."""
    out: dict[str, tuple[int, ...]] = {TEST_PREFIX + m: () for m in prefix_metrics}
    out[TEST_USERS] = ()
    return out


def validation_names() -> dict[str, tuple[int, ...]]:
    return {VAL_HITS: (), VAL_USERS: ()}
