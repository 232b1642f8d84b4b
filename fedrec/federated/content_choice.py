"""The content match's weight, chosen after training on the merchants' validation sums.

The match (`fedrec/content_match.py`) adds w p_c . z_i to the trained score. It is not trained:
only w is chosen, among `model.content_match_weights`, by the validation recall@20 of the model
trained on train alone (the early-stopped one), as each merchant's validation sums report it, the
way early stopping reads them. So a shop whose customers' content profiles say nothing keeps w = 0
and its model as trained. Each model then gets the profiles of the purchases it trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedrec.content_match import BASIS, WEIGHT, content_basis, content_vectors, with_profiles
from fedrec.data import MerchantData
from fedrec.evaluation import evaluate_val
from fedrec.features import ItemFeatures
from fedrec.model import ModelConfig


@dataclass(frozen=True)
class ContentMatch:
    """What validation chose: the weight (0: off, the vectors as trained), every candidate's
    validation recall@20, and the basis's rank (0 where the catalogue has no content)."""

    weight: float
    scores: dict[float, float]
    rank: int

    def entry(self) -> dict:
        """As the model card and the checkpoint record it."""
        return {
            "weight": self.weight,
            "basis_rank": self.rank,
            "val_recall@20": {f"{w:g}": round(v, 6) for w, v in self.scores.items()},
        }


def applies(cfg: ModelConfig, n_items: int, max_items: int, private: bool) -> bool:
    """Whether a run gets the match: a positive candidate, and a catalogue within the full-softmax
    switch (`max_items`: each candidate scores every validation customer against the whole
    catalogue). Under DP only a fixed weight (`fixed_weight`): a choice would read validation
    outside the accountant."""
    if n_items > max_items or not any(w > 0 for w in cfg.content_match_weights):
        return False
    return not private or fixed_weight(cfg) is not None


def block(match: ContentMatch | None) -> tuple[float, int]:
    """The weight and width of the block a model's vectors end with (0, 0: none): what a basket's
    fold-in must leave out of the tower's part and append (`fold_in_with_match`)."""
    return (match.weight, match.rank) if match is not None and match.weight > 0 else (0.0, 0)


def fixed(features: ItemFeatures, cfg: ModelConfig) -> tuple[ContentMatch, torch.Tensor | None]:
    """The DP form, in both runtimes: `fixed_weight` and the catalogue's basis, nothing chosen
    (weight 0 where the catalogue has no content)."""
    basis = content_basis(features, cfg.content_match_dim)
    if basis is None:
        return ContentMatch(0.0, {}, 0), None
    return ContentMatch(fixed_weight(cfg), {}, int(basis.shape[1])), basis


def fixed_weight(cfg: ModelConfig) -> float | None:
    """The weight when there is nothing to choose (one candidate, above 0), else None.

    Under DP this is the only form the match takes, and it costs no privacy: the basis is a
    function of the public catalogue, a customer's profile is computed at their merchant from their
    own purchases and enters only their own scores (as their user vector does, which DP leaves
    un-noised for the same reason), and nothing is read from validation."""
    weights = cfg.content_match_weights
    return float(weights[0]) if len(weights) == 1 and weights[0] > 0 else None


def candidate_names(weights: Sequence[float]) -> dict[str, tuple[int, ...]]:
    """A merchant's validation sums under each candidate weight, by the weight's position (the
    networked runtime's message whitelist)."""
    return {name: () for i in range(len(weights)) for name in (f"content/{i}/val/recall@20", f"content/{i}/val/users")}


def merchant_candidate_sums(
    m: MerchantData,
    users: torch.Tensor,
    items: torch.Tensor,
    bias: torch.Tensor | None,
    z: torch.Tensor,
    weights: Sequence[float],
    rows: np.ndarray | None = None,
) -> dict[str, torch.Tensor]:
    """One merchant's validation sums for each candidate weight, its terms of the sums the weight
    is chosen from (`items`: the tower's vectors; z: `content_vectors` of the catalogue; profiles
    from train purchases). Both runtimes."""
    scored = torch.cat([items, z.to(items.dtype)], 1)
    out: dict[str, torch.Tensor] = {}
    for i, w in enumerate(weights):
        val = evaluate_val(m, with_profiles(users, m.train, z, w), scored, bias, rows)
        out[f"content/{i}/val/recall@20"] = torch.tensor(float(val.sums["recall@20"]), dtype=torch.float64)
        out[f"content/{i}/val/users"] = torch.tensor(float(val.users), dtype=torch.float64)
    return out


def choose_from_sums(total: dict[str, torch.Tensor], weights: Sequence[float]) -> tuple[float, dict[float, float]]:
    """The weight with the highest validation recall@20 over the merchants' summed sums; a tie keeps
    the earlier one (list 0 first: the model as trained wins ties). Without validation customers
    (data.val_fraction = 0) there is nothing to choose on: 0, the model as trained."""
    scores: dict[float, float] = {}
    for i, w in enumerate(weights):
        users = float(total[f"content/{i}/val/users"])
        if users <= 0:
            return 0.0, {}
        scores[float(w)] = float(total[f"content/{i}/val/recall@20"]) / users
    return max(scores, key=scores.get), scores


def choose(
    merchants: Sequence[MerchantData],
    users: dict[str, torch.Tensor],
    items: torch.Tensor,
    biases: dict[str, torch.Tensor | None],
    features: ItemFeatures,
    cfg: ModelConfig,
    val_rows: dict[str, np.ndarray | None],
) -> tuple[ContentMatch, torch.Tensor | None]:
    """The weight (and the basis) for a trained model: `items` are its tower's vectors."""
    basis = content_basis(features, cfg.content_match_dim)
    if basis is None:
        return ContentMatch(0.0, {}, 0), None
    z = content_vectors(features, basis)  # once for every merchant
    total: dict[str, torch.Tensor] = {}
    for m in merchants:
        sums = merchant_candidate_sums(m, users[m.name], items, biases[m.name], z, cfg.content_match_weights,
                                       val_rows.get(m.name))  # fmt: skip
        total = {k: total.get(k, 0.0) + v for k, v in sums.items()}
    weight, scores = choose_from_sums(total, cfg.content_match_weights)
    return ContentMatch(weight, scores, int(basis.shape[1])), basis


def with_match(item_state: dict[str, torch.Tensor], basis: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
    """The item state with the match: the basis and weight in it, so every reader appends z."""
    return {**item_state, BASIS: basis, WEIGHT: torch.tensor(float(weight))}


def matched(
    merchants: Sequence[MerchantData],
    item_state: dict[str, torch.Tensor],
    users: dict[str, torch.Tensor],
    features: ItemFeatures,
    basis: torch.Tensor,
    weight: float,
    with_validation: bool,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A model with the match (`with_match`), and each customer's w p in their user vector, from
    the purchases the model trained on (train, or train + validation for the refit)."""
    z = content_vectors(features, basis)
    bought = {m.name: m.full_train if with_validation else m.train for m in merchants}
    return with_match(item_state, basis, weight), {
        name: with_profiles(u, bought[name], z, weight) for name, u in users.items()
    }
