"""A popularity prior for large catalogues: score = u . v + w log(1 + buyers_i), w chosen on validation.

Why: above `local.full_softmax_max_items` the model trains with sampled softmax and a strongly
regularised sampled user solve, and on a generated 62,572-product marketplace it ranked below
plain popularity (README, "Scale"). Adding the log of each product's pooled buyer count to the
trained model's scores, after training, lifted validation recall@20 from 0.036 to 0.052 there
(popularity alone: 0.036). Training with the prior inside the loss did worse on validation (one
probe: 0.024, 0.004 and 0.031 at rounds 5, 10 and 15), so it is added to the released scores only.

The counts are the sum over merchants of each one's buyers per product, and only that sum enters
the prior: a secure sum (SecAgg+) of one dense vector per merchant reveals exactly it. The
in-process runtime, which sees every merchant's sums anyway, adds them in the clear; the networked
one asks every merchant for its counts (`merchant_buyers`) and for its validation sums under each
candidate weight (`merchant_candidate_sums`), both through SecAgg+, and chooses from the totals
(`choose_from_sums`), as the in-process choice does (`choose_weight` is the same functions). The
counts carry no noise, so DP runs never use the prior.

The prior enters as an item bias (`scoring_vectors`: [u, 1] . [v, b]), so evaluation, the export
(each merchant's `item_bias.npy`), FAISS and the fold-in rank with it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedrec.data import MerchantData
from fedrec.errors import ConfigError
from fedrec.evaluation import evaluate_val
from fedrec.federated.local import LocalConfig


@dataclass(frozen=True)
class PopularityPrior:
    """What validation chose: the weight, every candidate's validation recall@20 (by weight), and the
    offsets w log(1 + buyers) added to every merchant's item bias in the released model."""

    weight: float
    scores: dict[float, float]
    offsets: torch.Tensor

    def entry(self, counts: str = "buyers per product, summed over merchants (in-process: added in the clear)") -> dict:
        """As the model card and the checkpoint record it; `counts` says how the counts were summed."""
        return {
            "weight": self.weight,
            "val_recall@20": {str(w): s for w, s in self.scores.items()},
            "counts": counts,
        }


def applies(cfg: LocalConfig, n_items: int, private: bool) -> bool:
    """Whether a run chooses the prior: a sampled-softmax catalogue, candidates to choose from, no DP."""
    return bool(cfg.sampled_popularity_weights) and n_items > cfg.full_softmax_max_items and not private


BUYERS, BUYERS_FULL = "prior/buyers", "prior/buyers_full"  # per product: train, train + validation


def buyer_names(n_items: int) -> dict[str, tuple[int, ...]]:
    """What a merchant sends for the prior's counts (the networked runtime's message whitelist)."""
    return {BUYERS: (n_items,), BUYERS_FULL: (n_items,)}


def candidate_names(weights: Sequence[float]) -> dict[str, tuple[int, ...]]:
    """A merchant's validation sums under each candidate weight, by the weight's position."""
    return {name: () for i in range(len(weights)) for name in (f"prior/{i}/val/recall@20", f"prior/{i}/val/users")}


def merchant_buyers(m: MerchantData) -> dict[str, torch.Tensor]:
    """One merchant's customers per product, in train and in train + validation: its terms of the sums."""
    return {
        BUYERS: torch.from_numpy(m.train.getnnz(axis=0).astype(np.float64)),
        BUYERS_FULL: torch.from_numpy(m.full_train.getnnz(axis=0).astype(np.float64)),
    }


def merchant_candidate_sums(
    m: MerchantData,
    users: torch.Tensor,
    item_vecs: torch.Tensor,
    bias: torch.Tensor | None,
    buyers: np.ndarray,
    weights: Sequence[float],
    rows: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """One merchant's validation sums (recall@20 hits, customers) with each candidate prior added
    to its bias: its terms of the sums the weight is chosen from."""
    out = {}
    for i, w in enumerate(weights):  # one shifted bias at a time: no copy per candidate
        val = evaluate_val(m, users, item_vecs, shifted(bias, prior_offsets(buyers, w)), rows)
        out[f"prior/{i}/val/recall@20"] = torch.tensor(float(val.sums["recall@20"]), dtype=torch.float64)
        out[f"prior/{i}/val/users"] = torch.tensor(float(val.users), dtype=torch.float64)
    return out


def choose_from_sums(total: dict[str, torch.Tensor], weights: Sequence[float]) -> tuple[float, dict[float, float]]:
    """The weight with the highest validation recall@20 over the merchants' summed candidate sums; a
    tie keeps the earlier one."""
    scores: dict[float, float] = {}
    for i, w in enumerate(weights):
        users = float(total[f"prior/{i}/val/users"])
        if users <= 0:
            raise ConfigError(
                "local.sampled_popularity_weights chooses on the validation slice, which is empty: set "
                "data.val_fraction > 0, or local.sampled_popularity_weights = [] (no prior)"
            )
        scores[float(w)] = float(total[f"prior/{i}/val/recall@20"]) / users
    return max(scores, key=scores.get), scores  # max keeps the first of equals: the earlier weight


def pooled_buyers(merchants: Sequence[MerchantData], with_validation: bool) -> np.ndarray:
    """Per product, the customers who bought it, summed over merchants (train, or train + validation)."""
    return sum((m.full_train if with_validation else m.train).getnnz(axis=0).astype(np.float64) for m in merchants)


def prior_offsets(buyers: np.ndarray, weight: float) -> torch.Tensor:
    return torch.from_numpy((weight * np.log1p(buyers)).astype(np.float32))


def shifted(bias: torch.Tensor | None, offsets: torch.Tensor) -> torch.Tensor:
    """A merchant's item bias plus `offsets` (a bias of one row per group gets them on each row).
    Without a bias of its own it is `offsets` itself, not a copy: a thousand merchants on a 1M
    catalogue would otherwise hold a thousand copies (2.9 GB); every reader copies or only reads."""
    return offsets if bias is None else bias + offsets.to(bias.dtype)


def with_offsets(biases: dict[str, torch.Tensor | None], offsets: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """Every merchant's item bias plus `offsets` (`shifted`)."""
    return {name: shifted(b, offsets) for name, b in biases.items()}


def choose_weight(
    merchants: Sequence[MerchantData],
    users: dict[str, torch.Tensor],
    item_vecs: torch.Tensor,
    biases: dict[str, torch.Tensor | None],
    weights: Sequence[float],
    val_rows: dict[str, np.ndarray | None],
) -> tuple[float, dict[float, float]]:
    """The weight whose prior (from train counts) scores the highest validation recall@20, summed
    over the merchants' validation sums as early stopping reads them; a tie keeps the earlier one.
    In-process, the networked runtime's path: each merchant's candidate sums, added up."""
    buyers = pooled_buyers(merchants, with_validation=False)
    total: dict[str, torch.Tensor] = {}
    for m in merchants:
        sums = merchant_candidate_sums(
            m, users[m.name], item_vecs, biases[m.name], buyers, weights, val_rows.get(m.name)
        )  # fmt: skip
        total = {k: total.get(k, 0.0) + v for k, v in sums.items()}
    return choose_from_sums(total, weights)
