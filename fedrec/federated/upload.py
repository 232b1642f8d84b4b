"""What a merchant's upload costs on the wire, and the lossy encodings that make it smaller.

The message is the merchant's terms of the round's sums (`aggregation.merchant_sums`). Its size is
set by the item tower: with one id row per product it grows with the catalogue (1M products x 64
dims x 4 bytes = 256 MB); with compositional ids (`ModelConfig.id_rows`) it does not. Two further
encodings are measured in `make bench-train`:
- half precision: the merchant rounds its delta to float16 before weighting it (lossy; the sums
  stay float32, so large weights cannot overflow);
- touched rows only: the non-zero rows of the id table with their indices. Lossless (decoding
  gives the dense tensor back), but the indices are the set of products that merchant sold in
  the round, so it is only safe inside secure aggregation's masking, which needs one dense
  vector layout for all: SecAgg+ as used here cannot carry it. Modelled as bytes only.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

PRECISIONS = {"float32": 4, "float16": 2}
INDEX_BYTES = 4  # int32 row index


def round_delta(delta: Mapping[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """The delta as the coordinator would decode it after `precision` on the wire."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown upload precision {precision!r}; choose one of {tuple(PRECISIONS)}")
    if precision == "float32":
        return dict(delta)
    return {k: v.to(torch.float16).to(torch.float32) for k, v in delta.items()}


def _dense_tensor_bytes(t: torch.Tensor, precision: str) -> int:
    return t.numel() * (PRECISIONS[precision] if t.dim() else 4)  # scalars (weights) stay 4-byte floats


def dense_bytes(sums: Mapping[str, torch.Tensor], precision: str = "float32") -> int:
    """Bytes of a message sent as dense tensors: tensors at `precision`, scalars (weights) at 4."""
    return sum(_dense_tensor_bytes(t, precision) for t in sums.values())


def touched_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices, rows) of a 2-D tensor's non-zero rows: the sparse encoding."""
    idx = torch.nonzero(t.abs().sum(1) > 0).flatten()
    return idx, t[idx]


def from_touched_rows(idx: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    out = torch.zeros(n_rows, rows.shape[1], dtype=rows.dtype)
    out[idx] = rows
    return out


def sparse_row_bytes(sums: Mapping[str, torch.Tensor], precision: str = "float32") -> int:
    """Bytes with every 2-D tensor sent as its touched rows (plus an index per row)."""
    total = 0
    for t in sums.values():
        if t.dim() == 2:
            idx, rows = touched_rows(t)
            total += len(idx) * (INDEX_BYTES + rows.shape[1] * PRECISIONS[precision])
        else:
            total += _dense_tensor_bytes(t, precision)
    return total
