"""Training losses for the two towers (pure functions of embeddings).

`softmax` (full catalogue) is the default: it measured best on ml100k-temporal (README), and a
catalogue of a few thousand items makes the exact normaliser cheap. `sampled_softmax` (in-batch
negatives with log-q correction) is the scalable variant; `bpr` the classic pairwise baseline;
`ials` the weighted squared loss of implicit ALS, whose every-item term is exact and cheap through
the item Gramian.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("softmax", "sampled_softmax", "bpr", "ials")


def softmax_loss(
    u: torch.Tensor,
    all_items: torch.Tensor,
    pos: torch.Tensor,
    temperature: float,
    item_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score = u . v (+ the merchant's own item bias), over the whole catalogue."""
    scores = u @ all_items.T
    if item_bias is not None:
        scores = scores + item_bias
    return F.cross_entropy(scores / temperature, pos)


def sampled_softmax_loss(
    u: torch.Tensor,
    v_pos: torch.Tensor,
    pos: torch.Tensor,
    log_q: torch.Tensor,
    temperature: float,
    item_bias: torch.Tensor | None = None,
    v_neg: torch.Tensor | None = None,
    neg: torch.Tensor | None = None,
    n_items: int = 0,
) -> torch.Tensor:
    """In-batch negatives; subtracting log q(item) undoes the popularity bias of the sampler.

    With `v_neg` (the vectors of `neg`, drawn uniformly from the `n_items` catalogue): mixed
    negative sampling (Yang et al., 2020). Each candidate's logit is corrected by the log of its
    expected count among the candidates: B q(item) for in-batch ones (`log_q` = log q), K / N for
    the K uniform ones, so the in-batch sampler's popularity skew is undone and the uniform ones
    reach the long tail that in-batch negatives never show.
    """
    scores = u @ v_pos.T
    if item_bias is not None:
        scores = scores + item_bias[pos][None, :]
    logits = scores / temperature - log_q[pos][None, :]
    same_item = pos[None, :] == pos[:, None]
    same_item.fill_diagonal_(False)  # other rows with the same item are not negatives
    logits = logits.masked_fill(same_item, float("-inf"))
    if v_neg is not None:
        logits = logits - float(np.log(len(pos)))
        extra = u @ v_neg.T
        if item_bias is not None:
            extra = extra + item_bias[neg][None, :]
        extra = extra / temperature - float(np.log(len(neg) / n_items))
        extra = extra.masked_fill(neg[None, :] == pos[:, None], float("-inf"))  # a row's own positive
        logits = torch.cat([logits, extra], 1)
    return F.cross_entropy(logits, torch.arange(len(pos), device=pos.device))


def bpr_loss(
    u: torch.Tensor,
    v_pos: torch.Tensor,
    v_neg: torch.Tensor,
    b_pos: torch.Tensor | float = 0.0,
    b_neg: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    return -F.logsigmoid((u * v_pos).sum(-1) + b_pos - (u * v_neg).sum(-1) - b_neg).mean()


def ials_loss(
    u: torch.Tensor,
    v_pos: torch.Tensor,
    gram: torch.Tensor,
    user_share: torch.Tensor,
    alpha: float,
    b_pos: torch.Tensor | float = 0.0,
    vb: torch.Tensor | float = 0.0,
    bb: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """The implicit-ALS loss (Hu et al., 2008) of a batch of purchases, mean per purchase.

    Over a customer: sum_S (1 + alpha)(1 - x_i)^2 + sum_{i not in S} x_i^2, x_i = u . v_i (+ b_i):
    every item is a weighted negative, as in ALS, yet the all-items part is u' G u (+ the bias
    terms 2 u . V'b + |b|^2) with G = V'V, so a step costs catalogue x dim^2 once, not per user.
    Each purchase carries `user_share` (1 / the customer's purchases) of its customer's all-items
    term, so an epoch counts every customer's once. Measured on validation (README, "A new shop's
    file"): ahead of the softmax on the generated sparse shop, well behind it on MovieLens and the
    synthetic shop, hence opt-in.
    """
    x = (u * v_pos).sum(-1) + b_pos
    every_item = ((u @ gram) * u).sum(-1) + 2.0 * (u * vb).sum(-1) + bb
    return ((1.0 + alpha) * (1.0 - x).pow(2) - x.pow(2) + user_share * every_item).mean()
