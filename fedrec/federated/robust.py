"""Robust aggregation: rules that bound what one merchant can do to the shared tower.

FedAvg trusts every merchant twice: its delta, and its weight n_k (nobody can check how many
purchases a merchant trained on). One fake merchant that claims a large n_k, or scales its delta,
moves the shared tower wherever it likes (model replacement, Bagdasaryan et al., 2020). Each rule
here reads every merchant's own delta, so it needs the coordinator to see them: **none of them can
run under secure aggregation over the whole round**, which shows the coordinator only the sum.
Two ways round it: run the rule over the sums of random groups of merchants, one secure sum per
group (`groups.py`, `federation.robust_groups`, both runtimes; each group sum then shows more than
the round's sum), or bound the aggregate's rows, reading the sum alone (`sum_clip.py`,
`federation.sum_clip`). Without groups the networked runtime refuses `federation.robust`.

- norm_clip: each merchant's delta is scaled down to at most `clip_multiple` times the round's
  median delta norm, and its weight capped at `clip_multiple` times the round's median n_k (Sun et
  al., 2019, "Can you really backdoor FL?", with the bound taken from the round itself); then the
  weighted mean. At 1 it costs big honest merchants most of their weight; a larger multiple lets
  them through and lets an attacker in further (`make attack-report`, README "Attacks").
- row_clip: norm_clip row by row. Each row of each tensor (one product's id vector, one token's
  vector, one unit's weights; a 1-D tensor counts as one row) of each merchant's delta is scaled
  down to at most `clip_multiple` times the round's median over merchants of that row's norm,
  and weights are capped as in norm_clip. Promoting one product needs a large move of one row,
  which a whole-delta bound lets through (the rest of the delta is small); the row's median says
  how far honest merchants moved that product this round. It costs the rows only one merchant
  moves much (a product only one shop sells), which the median drags down (measured: README,
  "Attacks").
- row_clip_foolsgold: row_clip, with each merchant's capped weight also multiplied by FoolsGold's
  factor (Fung et al., 2020, "The Limitations of Federated Learning in Sybil Settings"; below),
  computed on the row-clipped deltas. A bound per merchant cannot stop colluders: each fake
  merchant gets its own bound, and k of them pushing one product the same way add up to k times
  it, while honest shops' moves of that row point every which way. Colluders that push together
  send updates far more alike than honest shops' (measured: README, "Attacks"), which FoolsGold
  turns into weights near 0. It does nothing against one attacker (hence built on row_clip) or
  against colluders that make their updates look unalike: noise of their own on their other rows
  evades it at no cost to their push on the target's row (measured: README, "Attacks"). One
  change from the paper: its factors are scaled to the most distinct merchant, and honest shops
  that are alike (similar regional stores) next to a lone attacker unlike all of them were then
  cut, so the attacker's push dominated (measured: README, "Attacks"); here they are scaled to
  the median merchant, so at least half keep a factor of 1. As in the paper, the factors scale
  each merchant's step and the mean keeps row_clip's denominator, so no merchant's share grows
  when others are cut. The similarity is taken after the row clip, on what enters the mean. A
  coalition of half the merchants or more sets the median itself.
- trimmed_mean: per coordinate, the `trim` share of largest and of smallest values is dropped and
  the rest averaged, unweighted (Yin et al., 2018).
- median: the coordinate-wise median, unweighted (Yin et al., 2018).

Each merchant's delta is decoded from its own terms of the sums (`aggregate_sums` of one message),
so FedNova's step normalisation applies as it does in the sum form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedrec.federated.aggregation import WEIGHT, aggregate_sums

ROBUST_RULES = ("none", "norm_clip", "row_clip", "row_clip_foolsgold", "trimmed_mean", "median")
CLIPPING_RULES = ("norm_clip", "row_clip", "row_clip_foolsgold")  # the rules `clip_multiple` bounds


def _norm(delta: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((v.double() ** 2).sum() for v in delta.values()))


def _row_norms(v: torch.Tensor) -> torch.Tensor:
    """Each row's L2 norm, shaped to broadcast against `v` (a 1-D tensor is one row: a scalar)."""
    if v.dim() <= 1:
        return v.double().reshape(1, -1).norm(dim=1)[0]
    return v.double().flatten(1).norm(dim=1).reshape(-1, *(1,) * (v.dim() - 1))


def _capped_weights(messages: Sequence[Mapping[str, torch.Tensor]], multiple: float) -> torch.Tensor:
    """Each n_k capped at `multiple` x the round's median n_k: nobody can check a merchant's claimed
    purchases, so none buys more influence than that."""
    weights = torch.stack([m[WEIGHT].double() for m in messages])
    return torch.clamp(weights, max=multiple * weights.median())


def foolsgold_weights(deltas: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Each merchant's FoolsGold factor in [0, 1] from the round's deltas (Fung et al., 2020, Alg. 1).

    A merchant whose delta points where another's does (cosine near 1) gets a factor near 0. The
    published steps: the pairwise cosine; "pardoning" (a merchant's similarity to one that is more
    alike to someone else is scaled down by the ratio of their largest similarities, so that two
    honest shops alike only to each other are not both cut); 1 - the largest similarity, rescaled;
    then the logit, + 0.5, clipped to [0, 1]. Two changes from the paper. It rescales so that the
    median merchant, not the most distinct one, has 0.99 (every merchant at or above it gets 1):
    the most distinct merchant may be the attacker. And it reads this round's deltas rather than
    each merchant's sum over all rounds: the function stays pure, and a coordinator that samples
    merchants keeps no history. When half the merchants or more have a twin (the median factor
    is 0) there is nothing to tell apart, and every factor is 1. The factors scale steps (the
    paper's per-client learning rates); they are not weights to renormalise.
    """
    flat = torch.stack([torch.cat([v.double().flatten() for v in d.values()]) for d in deltas])
    unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cs = unit @ unit.T - torch.eye(len(deltas), dtype=torch.float64)
    top = cs.max(dim=1).values
    pardon = top[:, None] < top[None, :]
    cs = torch.where(pardon, cs * top[:, None] / top[None, :].clamp_min(1e-12), cs)
    alpha = (1 - cs.max(dim=1).values).clamp(0, 1)
    scale = alpha.median()
    if scale <= 0:
        return torch.ones(len(deltas), dtype=torch.float64)
    alpha = (alpha / scale).clamp(max=0.99)
    return (torch.log(alpha / (1 - alpha)) + 0.5).clamp(0, 1)


def _row_scales(deltas: Sequence[Mapping[str, torch.Tensor]], clip_multiple: float) -> dict[str, torch.Tensor]:
    """Per tensor, merchants x rows: the factor that scales each row of each delta down to at most
    `clip_multiple` x the round's median over merchants of that row's norm."""
    out = {}
    for k in deltas[0]:
        norms = torch.stack([_row_norms(d[k]) for d in deltas])  # merchants x rows (x 1 ...)
        out[k] = torch.clamp(clip_multiple * norms.median(dim=0).values / norms.clamp_min(1e-12), max=1.0)
    return out


def robust_delta(
    messages: Sequence[Mapping[str, torch.Tensor]],
    rule: str,
    normalize_steps: bool = False,
    trim: float = 0.2,
    clip_multiple: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The round's pseudo-gradient from every merchant's own message (pure)."""
    if rule not in ROBUST_RULES or rule == "none":
        raise ValueError(f"unknown robust rule {rule!r}; choose one of {ROBUST_RULES[1:]}")
    if not clip_multiple >= 1:
        raise ValueError(f"clip_multiple {clip_multiple} must be >= 1 (below it even the median merchant is clipped)")
    if not messages:
        raise ValueError("no updates to aggregate")
    deltas = [aggregate_sums(m, "fedavg", normalize_steps) for m in messages]
    if rule == "norm_clip":
        norms = torch.stack([_norm(d) for d in deltas])
        clip = torch.clamp(clip_multiple * norms.median() / norms.clamp_min(1e-12), max=1.0)
        capped = _capped_weights(messages, clip_multiple)
        total = float(capped.sum())
        return {
            k: sum(float(w * c) * d[k] for w, c, d in zip(capped, clip, deltas, strict=True)) / total for k in deltas[0]
        }
    if rule in ("row_clip", "row_clip_foolsgold"):
        scales = _row_scales(deltas, clip_multiple)
        weights = _capped_weights(messages, clip_multiple)
        total = float(weights.sum())
        if rule == "row_clip_foolsgold":  # judged on what enters the mean, each row clipped
            clipped = [{k: scales[k][i] * d[k].double() for k in d} for i, d in enumerate(deltas)]
            weights = weights * foolsgold_weights(clipped)  # over row_clip's total: see foolsgold_weights
        out = {}
        for k in deltas[0]:
            terms = (float(w) * s * d[k].double() for w, s, d in zip(weights, scales[k], deltas, strict=True))
            out[k] = (sum(terms) / total).to(deltas[0][k].dtype)
        return out
    n = len(deltas)
    cut = int(trim * n) if rule == "trimmed_mean" else 0
    if not 0 <= cut < n - cut:
        raise ValueError(f"trim {trim} drops every update of {n}")
    out = {}
    for k in deltas[0]:
        ordered = torch.stack([d[k] for d in deltas]).sort(dim=0).values
        if rule == "median":
            out[k] = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2
        else:
            out[k] = ordered[cut : n - cut].mean(dim=0)
    return out
