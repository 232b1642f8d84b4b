"""Each merchant's served popularity weight: the w of score = u . v + w b its API uses by default.

Why: a merchant's item bias b is its own shop's popularity. At the trained score (w = 1) one
product was the first recommendation for a third of the synthetic shop's customers, against an
eighth for implicit's ALS (README, "Beyond accuracy"). Scaling b down spreads the lists at some
cost in recall, and how much it costs depends on the shop. So each merchant chooses w on its own
validation slice, with the early-stopped model (trained on train alone): the highest validation
recall@20 among `model.served_popularity_weights` whose top-1 share (the share of its customers
whose first item is its single most common first item) is at most `model.max_top1_share`; where
none is, the least concentrated. Equal recall keeps the larger w, nearer the trained score.

The bias, the customers and the validation purchases all stay at the merchant, so the choice is
made there and nothing about it leaves the merchant: after a refit the networked coordinator
sends the early-stopped tower (public, like every tower) with `finish` and gets nothing back for
it, and the node and the in-process runtime call the same `choose`. Every shop's share at most the
budget bounds the pooled share too (the most common first item overall is first for at most the
sum of each shop's most common one's customers).

What it changes: the export's merchant half records w (`SERVED_WEIGHT_FILE`), and the API uses it
when a request gives no `popularity_weight`. Training, early stopping and the refit never read it,
so the trained model and every benchmark at the trained score are unchanged. Under DP nothing is
chosen (validation would be read outside the accountant) and w stays 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedrec.data import MerchantData
from fedrec.evaluation import weighted_lists
from fedrec.metrics import top1_share
from fedrec.model import ModelConfig

# In each merchant's half of an export version; read by serving/export_store.py (which keeps
# torch out of the server, so it names the file itself: a test writes here and loads there).
SERVED_WEIGHT_FILE = "served_weight.json"


@dataclass(frozen=True)
class ServedWeight:
    """What one merchant chose: the weight, the budget, and every candidate's validation recall@20
    and top-1 share (by weight)."""

    weight: float
    max_top1_share: float
    validation: dict[float, dict[str, float]]

    def entry(self) -> dict:
        """As the merchant's export file and `make evaluate` record it."""
        return {
            "popularity_weight": self.weight,
            "max_top1_share": self.max_top1_share,
            "chosen_on": "this merchant's validation recall@20, top-1 share at most max_top1_share",
            "validation": {f"{w:g}": row for w, row in self.validation.items()},
        }


def applies(cfg: ModelConfig, n_items: int, max_items: int, private: bool) -> bool:
    """Whether a run chooses served weights: a bias to scale, candidates, a full-softmax catalogue
    (above it the popularity prior has the role), no DP."""
    return cfg.merchant_item_bias and bool(cfg.served_popularity_weights) and n_items <= max_items and not private


def choose(
    m: MerchantData,
    users: torch.Tensor,
    item_vecs: torch.Tensor,
    bias: torch.Tensor | None,
    candidates: Sequence[float],
    max_top1_share: float,
) -> ServedWeight | None:
    """The merchant's served weight (module docstring); None where there is nothing to choose: no
    bias, no candidates, or no customer with a validation purchase."""
    if bias is None or not candidates:
        return None
    rows: dict[float, dict[str, float]] = {}
    for w in candidates:
        sums, top = weighted_lists(m, users, item_vecs, bias, float(w), "val")
        if sums.users == 0:
            return None
        rows[float(w)] = {"recall@20": sums.sums["recall@20"] / sums.users, "top1_share": top1_share(top)}
    within = [w for w, r in rows.items() if r["top1_share"] <= max_top1_share]
    pool = within or [min(rows, key=lambda w: (rows[w]["top1_share"], -w))]
    best = max(pool, key=lambda w: (rows[w]["recall@20"], w))
    return ServedWeight(best, max_top1_share, rows)


def choose_all(
    merchants: Sequence[MerchantData],
    users: dict[str, torch.Tensor],
    item_vecs: torch.Tensor,
    biases: dict[str, torch.Tensor | None],
    candidates: Sequence[float],
    max_top1_share: float,
) -> dict[str, ServedWeight]:
    """`choose` for every merchant that has something to choose (each on its own slice)."""
    out = {}
    for m in merchants:
        chosen = choose(m, users[m.name], item_vecs, biases.get(m.name), candidates, max_top1_share)
        if chosen is not None:
            out[m.name] = chosen
    return out


def served_biases(
    biases: dict[str, torch.Tensor | None], chosen: dict[str, ServedWeight] | None
) -> dict[str, torch.Tensor | None]:
    """Each merchant's bias scaled by its served weight (unchanged where it chose none): what its
    API ranks with by default."""
    chosen = chosen or {}
    return {n: b if b is None or n not in chosen else chosen[n].weight * b for n, b in biases.items()}
