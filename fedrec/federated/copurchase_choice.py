"""The co-purchase term's lambda and weight, chosen after training on the merchants' validation sums.

The term (`fedrec/copurchase.py`) adds w s (x_c B)_i to the trained score. Only lam (EASE's ridge)
and w are chosen, among `model.copurchase_lambdas` x `model.copurchase_weights`, by the validation
recall@20 of the model trained on train alone (the early-stopped one, with its content match), as
each merchant's validation sums report it; w = 0 (the model as trained) wins ties. s, the ratio of
the spreads of the model's and EASE's scores over the training customers, makes w scale-free.
In-process only (`config.check_networked` refuses it): B needs the summed Gram, a message the
networked runtime does not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedrec.copurchase import (
    ITEMS,
    MAX_CELLS,
    MAX_ITEMS,
    ease_solver,
    gram,
    item_block,
    purchase_rows,
    score_spread,
    spread,
    with_block,
    with_purchases,
)
from fedrec.data import MerchantData
from fedrec.evaluation import combine_sums, evaluate_val
from fedrec.model import ModelConfig, scoring_vectors


@dataclass(frozen=True)
class CoPurchase:
    """What validation chose: the weight (0: off), lam, the scale s, every candidate's validation
    recall@20 ("lam/w"; "0" for the model as trained) and the block's width (the trained catalogue)."""

    weight: float
    lam: float
    scale: float
    scores: dict[str, float]
    width: int

    def entry(self) -> dict:
        """As the model card and the checkpoint record it."""
        return {
            "weight": self.weight,
            "lambda": self.lam,
            "scale": self.scale,
            "width": self.width if self.weight > 0 else 0,
            "val_recall@20": {k: round(v, 6) for k, v in self.scores.items()},
        }


def applies(cfg: ModelConfig, n_items: int, customers: int, private: bool) -> bool:
    """A positive candidate weight, a catalogue of at most `MAX_ITEMS` (B is dense), at most
    `MAX_CELLS` customer-product pairs (the purchase rows are dense while choosing) and no DP (the
    Gram carries no noise)."""
    sized = n_items <= MAX_ITEMS and customers * n_items <= MAX_CELLS
    return any(w > 0 for w in cfg.copurchase_weights) and sized and not private


def block(chosen: CoPurchase | None) -> tuple[float, int]:
    """The weight and width of the block a model's vectors end with ((0, 0): none): what a basket's
    fold-in leaves out of the tower's part and appends (`content_profiles.fold_in_with_match`)."""
    return (chosen.weight, chosen.width) if chosen is not None and chosen.weight > 0 else (0.0, 0)


def _val_recall(merchants, users, items, biases, val_rows) -> float:  # noqa: ANN001
    total = combine_sums(
        [evaluate_val(m, users[m.name], items, biases[m.name], val_rows.get(m.name)) for m in merchants]
    )
    return total.sums["recall@20"] / total.users if total.users else float("nan")


def choose(
    merchants: Sequence[MerchantData],
    users: dict[str, torch.Tensor],
    items: torch.Tensor,
    biases: dict[str, torch.Tensor | None],
    cfg: ModelConfig,
    val_rows: dict[str, np.ndarray | None],
) -> tuple[CoPurchase, np.ndarray | None]:
    """lam and w for a trained model (`items`: its vectors, content match included), and the chosen
    B on train (None when w = 0)."""
    g = gram([m.train for m in merchants])
    model_spread = spread([score_spread(*scoring_vectors(users[m.name], items, biases[m.name], m.user_groups))
                           for m in merchants])  # fmt: skip
    rows = {m.name: purchase_rows(m.train) for m in merchants}  # dense once, for every candidate
    base = _val_recall(merchants, users, items, biases, val_rows)
    if not np.isfinite(base):  # no validation customers (data.val_fraction = 0): nothing to choose on
        return CoPurchase(0.0, 0.0, 0.0, {}, 0), None
    scores, best = {"0": base}, (base, 0.0, 0.0, 0.0, None)
    solve = ease_solver(g)  # G's range found once (large catalogues), then each lambda
    for lam in cfg.copurchase_lambdas:
        b = solve(lam)
        bt = item_block(b, 1.0)  # EASE's own scores: B's columns as the item side, unscaled
        ease_spread = spread([score_spread(rows[m.name], bt) for m in merchants])
        scale = model_spread / ease_spread if ease_spread > 0 else 0.0
        scored = with_block(items, item_block(b, scale))
        for w in (w for w in cfg.copurchase_weights if w > 0):
            with_x = {m.name: with_purchases(users[m.name], rows[m.name], w) for m in merchants}
            recall = _val_recall(merchants, with_x, scored, biases, val_rows)
            scores[f"{lam:g}/{w:g}"] = recall
            if recall > best[0]:
                best = (recall, float(w), float(lam), float(scale), b)
    _, weight, lam, scale, b = best
    return CoPurchase(weight, lam, scale, scores, g.shape[0]), b


def added(
    merchants: Sequence[MerchantData],
    item_state: dict[str, torch.Tensor],
    users: dict[str, torch.Tensor],
    chosen: CoPurchase,
    with_validation: bool,
    b: np.ndarray | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A model with the term: its item block in the state, and each customer's w x in their user
    vector, from the purchases the model trained on (train, or train + validation for the refit).
    `b`: B already solved from those purchases (else solved here, with the chosen lam)."""
    bought = {m.name: m.full_train if with_validation else m.train for m in merchants}
    if b is None:
        b = ease_solver(gram(list(bought.values())))(chosen.lam)
    state = {**item_state, ITEMS: item_block(b, chosen.scale)}
    return state, {name: with_purchases(u, purchase_rows(bought[name]), chosen.weight) for name, u in users.items()}


__all__ = ["MAX_CELLS", "MAX_ITEMS", "CoPurchase", "added", "applies", "block", "choose"]
