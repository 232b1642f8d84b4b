"""The co-purchase term's lambda and weight, chosen after training on the merchants' validation sums.

The term (`fedrec/copurchase.py`) adds w s (x_c B)_i to the trained score. Only lam (EASE's ridge)
and w are chosen, among `model.copurchase_lambdas` x `model.copurchase_weights` and w = 0 (the
model as trained), on the validation slice of the model trained on train alone (the early-stopped
one, with its content match), from the merchants' validation sums: among the candidates within one
standard error of the best validation recall@20, the one whose lists are least concentrated
(`fedrec/federated/one_se.py`; why: on MovieLens the candidates' recalls differ by less than
their noise, their top-1 shares by a factor of up to 4.6). s, the ratio of the spreads of the model's and EASE's scores
over the training customers, makes w scale-free.
In-process only (`config.check_networked` refuses it): B needs the summed Gram, a message the
networked runtime does not have.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

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
from fedrec.evaluation import val_recall_and_firsts
from fedrec.federated.one_se import CandidateSums, candidate_sums, least_concentrated_within_one_se
from fedrec.model import ModelConfig, scoring_vectors


@dataclass(frozen=True)
class CoPurchase:
    """What validation chose: the weight (0: off), lam, the scale s, every candidate's validation
    recall@20 ("lam/w"; "0" for the model as trained), the block's width (the trained catalogue),
    and per candidate the one-standard-error rule's inputs (`OneSEChoice.row`)."""

    weight: float
    lam: float
    scale: float
    scores: dict[str, float]
    width: int
    rule: dict[str, dict] = field(default_factory=dict)

    def entry(self) -> dict:
        """As the model card and the checkpoint record it."""
        return {
            "weight": self.weight,
            "lambda": self.lam,
            "scale": self.scale,
            "width": self.width if self.weight > 0 else 0,
            "val_recall@20": {k: round(v, 6) for k, v in self.scores.items()},
            "chosen_by": "least concentrated (validation top-1 share) within one standard error of the best",
            "val_rule": {
                k: {a: round(v, 6) if isinstance(v, float) else v for a, v in r.items()} for k, r in self.rule.items()
            },
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


def _val_lists(merchants, users, items, biases, val_rows, into: dict[str, list]) -> None:  # noqa: ANN001
    """Each merchant's per-customer validation recall and first item under one candidate, kept
    at the merchant (`into[name]`) until it sends their sums."""
    for m in merchants:
        into[m.name].append(val_recall_and_firsts(m, users[m.name], items, biases[m.name], val_rows.get(m.name)))


def _summed(kept: dict[str, list], n_items: int) -> CandidateSums:
    """What the merchants send (their `CandidateSums`), added as the coordinator adds them."""
    parts = [candidate_sums(np.stack([r for r, _ in runs], 1), np.stack([f for _, f in runs], 1), n_items)
             for runs in kept.values()]  # fmt: skip
    return sum(parts[1:], parts[0])


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
    kept: dict[str, list] = {m.name: [] for m in merchants}
    _val_lists(merchants, users, items, biases, val_rows, kept)
    if not any(len(runs[0][0]) for runs in kept.values()):  # no validation customers: nothing to choose on
        return CoPurchase(0.0, 0.0, 0.0, {}, 0), None
    labels, settings = ["0"], [(0.0, 0.0, 0.0)]
    solve = ease_solver(g)  # G's range found once (large catalogues), then each lambda
    for lam in cfg.copurchase_lambdas:
        b = solve(lam)
        bt = item_block(b, 1.0)  # EASE's own scores: B's columns as the item side, unscaled
        ease_spread = spread([score_spread(rows[m.name], bt) for m in merchants])
        scale = model_spread / ease_spread if ease_spread > 0 else 0.0
        scored = with_block(items, item_block(b, scale))
        for w in (w for w in cfg.copurchase_weights if w > 0):
            with_x = {m.name: with_purchases(users[m.name], rows[m.name], w) for m in merchants}
            _val_lists(merchants, with_x, scored, biases, val_rows, kept)
            labels.append(f"{lam:g}/{w:g}")
            settings.append((float(w), float(lam), float(scale)))
    rule = least_concentrated_within_one_se(_summed(kept, g.shape[0]))
    weight, lam, scale = settings[rule.chosen]
    scores = {k: float(rule.means[i]) for i, k in enumerate(labels)}
    chosen = CoPurchase(weight, lam, scale, scores, g.shape[0], {k: rule.row(i) for i, k in enumerate(labels)})
    # B solved once more for the chosen lam, rather than keeping one catalogue x catalogue matrix per
    # candidate lam until the rule has seen them all (8 GB at 16,000 products and four lambdas)
    return chosen, (solve(lam) if weight > 0 else None)


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
