"""Train only the content-token rows the catalogue uses.

The hashed token table has `hash_buckets` rows (16,384 by default) whatever the catalogue, and a
catalogue of a few thousand products uses a few hundred to a few thousand of them. A local
update that carried the whole table would back-propagate into, and run Adam over, a million
values that never get a gradient. Every row outside the catalogue's tokens keeps its received
value (Adam starts from zero moments each round, so a row without gradient does not move), so
cutting the table to the used rows and scattering the delta back gives the same update, bit for
bit (tested), at a fraction of the cost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from fedrec.features import ItemFeatures, derived
from fedrec.model import ModelConfig

TABLE = "feat_emb.weight"


@dataclass(frozen=True)
class TokenRows:
    """The used rows of the token table, and the catalogue's tokens renumbered onto them."""

    rows: torch.Tensor  # sorted ids of the used token rows (the padding row excluded)
    features: ItemFeatures  # tokens renumbered 0..len(rows)-1; padding is len(rows)
    model_cfg: ModelConfig  # hash_buckets = len(rows): the cut table's padding row is its last

    def cut(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The state with only the used token rows (and the zero padding row) in the table."""
        table = state[TABLE]
        return {**state, TABLE: torch.cat([table[self.rows], table[-1:]])}

    def expand(self, delta: dict[str, torch.Tensor], shape: torch.Size) -> dict[str, torch.Tensor]:
        """A delta of the cut state as a delta of the whole table: zero on every unused row."""
        full = delta[TABLE].new_zeros(shape)
        full[self.rows] = delta[TABLE][: len(self.rows)]
        return {**delta, TABLE: full}


def token_rows(features: ItemFeatures, cfg: ModelConfig) -> TokenRows | None:
    """The catalogue's `TokenRows` (its rows found once per catalogue), or None when there is no
    content tower or the catalogue uses most of the table anyway."""
    if not cfg.use_content:
        return None
    found = derived(features, ("token_rows", cfg.hash_buckets), lambda: _used_rows(features, cfg.hash_buckets))
    if found is None:
        return None
    rows, cut_features = found
    return TokenRows(rows, cut_features, dataclasses.replace(cfg, hash_buckets=len(rows)))


def _used_rows(features: ItemFeatures, buckets: int) -> tuple[torch.Tensor, ItemFeatures] | None:
    # The padding id is the largest token, so it renumbers to len(rows): the cut table's padding.
    used, renumbered = torch.unique(features.tokens, return_inverse=True)
    rows = used[used != buckets]
    return (rows, ItemFeatures(renumbered, len(rows))) if 2 * len(rows) < buckets else None
