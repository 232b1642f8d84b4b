"""Training losses for the two towers (pure functions of embeddings).

`softmax` (full catalogue) is the default: it measured best on ml100k-temporal (README), and a
catalogue of a few thousand items makes the exact normaliser cheap. `sampled_softmax` (in-batch
negatives with log-q correction) is the scalable variant; `bpr` the classic pairwise baseline.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LOSSES = ("softmax", "sampled_softmax", "bpr")


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
