"""Aggregation from sums only: the coordinator divides sums by sums, never reads one merchant.

Each merchant turns its local result into pre-weighted tensors (`merchant_sums`); the coordinator
adds them up (`add_sums`, a running sum: under secure aggregation the same sum is computed without
anyone seeing its terms) and turns the total into the pseudo-gradient (`aggregate_sums`). The
in-process and the networked runtime both go through these three functions.

With n_k the merchant's training positives, tau_k its local steps, delta_k its item-tower delta
and S[x] the sum of x over the merchants of a round:
fedavg (McMahan et al., 2017): S[n delta] / S[n].
normalize_steps (FedNova, Wang et al., 2020): a merchant with more data takes more local steps and
so returns a longer delta; weighting it by n_k again counts it twice (weight ~ n_k^2), and small
merchants all but vanish. FedNova averages per-step deltas and rescales by the mean step count:
S[n delta / tau] / S[n] * S[n tau] / S[n], so each merchant's pull is proportional to n_k.
rowwise: the same for dense tensors; row i of the item-id table is averaged only over merchants
that had a purchase of item i, so a merchant that never sold an item does not drag that row to
zero: S[n 1_i delta_i] / S[n 1_i] (with the FedNova terms likewise). Rows no merchant of the round
touched fall back to fedavg. Only this rule sends the per-row weights n 1_i, which tell who sold
what unless secure aggregation hides the terms; fedavg never sends them.
als (with `local.ials_item_step = "exact"`): the merchants send sums of ALS's normal-equation terms
instead of a delta, and the coordinator solves the item table from them
(`fedrec/federated/ials_item_step.py`). A merchant's per-product terms are zero for the products
it did not sell, so like rowwise's weights they tell who sold what; the networked runtime, whose
secure aggregation would hide that, does not run this rule yet.
auto (the default): als with the exact item step, else rowwise wherever it applies, else fedavg
(`resolve_rule`). Chosen on the
validation slice: rowwise had the higher best validation recall@20 on both shipped datasets
(results/validation-federation.aggregation-<dataset>.json, `make validate-aggregation`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from fedrec.errors import ConfigError
from fedrec.federated.ials_item_step import TABLE, item_step_delta, item_step_names
from fedrec.federated.sum_clip import clip_rows_of_sum
from fedrec.privacy import noisy_als

AGGREGATIONS = ("fedavg", "rowwise")
RULES = ("auto", *AGGREGATIONS)  # what federation.aggregation accepts
ALS = "als"  # auto's rule for the exact ials item step: solved, not averaged
ALS_DP = "als_dp"  # the same under privacy.mechanism = 'als': clipped, noised sums (privacy/noisy_als.py)
ITEM_STEP_RULES = (ALS, ALS_DP)
ROW_TENSORS = (TABLE,)
WEIGHT, STEPS, LOSS = "n", "n_tau", "n_loss"
ROW_WEIGHT, ROW_STEPS = "rows/n", "rows/n_tau"
DELTA, ROW_DELTA = "delta/", "rows/delta/"


def resolve_rule(
    rule: str,
    shapes: Mapping[str, tuple[int, ...]],
    private: bool,
    robust: str,
    loss: str = "softmax",
    item_step: str = "sgd",
) -> str:
    """The rule a run uses: `auto` is als for the exact ials item step, else rowwise where rowwise
    applies, else fedavg.

    Rowwise needs one id row per product (hashed ids share rows between products), and it sends
    per-row weights that say which rows had purchases: differential privacy does not noise them,
    and the robust rules read each merchant's own delta, so both keep fedavg. Under the ials loss
    every merchant's gradient reaches every row (each item is a weighted negative of each
    customer), so dividing a row by the merchants that sold it would multiply the others' push:
    fedavg there too (new shop, validation recall@20: 0.027 rowwise, 0.054 fedavg).
    """
    if rule != "auto":
        return rule
    if loss == "ials" and item_step == "exact":
        return ALS_DP if private else ALS
    per_product_ids = ROW_TENSORS[0] in shapes and "item_emb_q.weight" not in shapes
    return "rowwise" if per_product_ids and not private and robust == "none" and loss != "ials" else "fedavg"


def sum_names(shapes: Mapping[str, tuple[int, ...]], rule: str) -> dict[str, tuple[int, ...]]:
    """Every tensor a merchant's message holds under `rule`, with its shape (the message whitelist)."""
    if rule == ALS:
        return {WEIGHT: (), STEPS: (), LOSS: (), **item_step_names(shapes)}
    if rule == ALS_DP:
        item_step_names(shapes)  # the same tower check: an id table with one row per product
        n_items, dim = shapes[TABLE]
        return {WEIGHT: (), STEPS: (), LOSS: (), noisy_als.GRAM: (dim, dim), noisy_als.RHS: (n_items, dim)}
    if rule not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {rule!r}; choose one of {AGGREGATIONS}")
    names = {WEIGHT: (), STEPS: (), LOSS: ()}
    names.update({DELTA + k: tuple(v) for k, v in shapes.items()})
    if rule == "rowwise":
        if "item_emb_q.weight" in shapes:
            raise ConfigError(
                "federation.aggregation 'rowwise' averages one id row per product, but this catalogue has "
                "compositional ids (more than 2 x model.id_rows products): use 'fedavg', or model.id_rows = 0"
            )
        n_items = shapes[ROW_TENSORS[0]][0]
        names.update({ROW_WEIGHT: (n_items,), ROW_STEPS: (n_items,)})
        names.update({ROW_DELTA + k: tuple(shapes[k]) for k in ROW_TENSORS})
    return names


def merchant_sums(
    delta: Mapping[str, torch.Tensor],
    num_examples: int,
    num_steps: int,
    touched_rows: torch.Tensor,
    mean_loss: float,
    rule: str,
    normalize_steps: bool,
    item_terms: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One merchant's terms of the round's sums (pure). n_k and tau_k only appear multiplied in.
    Under als, `item_terms` (the exact item step's, unweighted: they are sums over customers
    already) replace the delta."""
    if num_examples <= 0 or num_steps <= 0:
        raise ValueError("num_examples and num_steps must be positive")
    n = torch.tensor(float(num_examples))
    tau = torch.tensor(float(num_steps))
    scale = n / tau if normalize_steps else n
    out = {WEIGHT: n, STEPS: n * tau, LOSS: n * float(mean_loss)}
    if (rule in ITEM_STEP_RULES) != (item_terms is not None):
        raise ValueError("the als rules send the item step's terms, and only they do")
    if rule in ITEM_STEP_RULES:
        return {**out, **{k: v.float() for k, v in item_terms.items()}}
    out.update({DELTA + k: (scale * v).float() for k, v in delta.items()})
    if rule == "rowwise":
        touched = touched_rows.float()
        out[ROW_WEIGHT] = n * touched
        out[ROW_STEPS] = n * tau * touched
        for k in ROW_TENSORS:
            t = delta[k]
            out[ROW_DELTA + k] = (scale * touched.reshape(-1, *(1,) * (t.dim() - 1)) * t).float()
    elif rule not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {rule!r}; choose one of {AGGREGATIONS}")
    return out


def add_sums(total: dict[str, torch.Tensor] | None, terms: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Running sum: memory is one message whatever the number of merchants."""
    if total is None:
        return {k: v.clone() for k, v in terms.items()}
    if set(total) != set(terms):
        raise ValueError(f"cannot add sums with different tensors: {sorted(set(total) ^ set(terms))}")
    for k, v in terms.items():
        total[k] += v
    return total


def sum_all(messages: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    total = None
    for m in messages:
        total = add_sums(total, m)
    if total is None:
        raise ValueError("no updates to aggregate")
    return total


def aggregate_sums(
    total: Mapping[str, torch.Tensor], rule: str, normalize_steps: bool = False
) -> dict[str, torch.Tensor]:
    """The pseudo-gradient from the round's sums: sums divided by sums (pure). The als rule's is
    solved instead: `ials_item_step.item_step_delta`."""
    if rule not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {rule!r}; choose one of {AGGREGATIONS}")
    n = total[WEIGHT]
    if n <= 0:
        raise ValueError("no updates to aggregate")
    rescale = total[STEPS] / n if normalize_steps else 1.0
    out = {k[len(DELTA) :]: v / n * rescale for k, v in total.items() if k.startswith(DELTA)}
    if rule == "rowwise":
        rows_n = total[ROW_WEIGHT]
        touched = rows_n > 0
        safe = rows_n.clamp_min(1e-12)
        row_rescale = total[ROW_STEPS] / safe if normalize_steps else torch.ones_like(rows_n)
        for k in ROW_TENSORS:
            t = total[ROW_DELTA + k]
            shape = (-1, *(1,) * (t.dim() - 1))
            by_row = t / safe.reshape(shape) * row_rescale.reshape(shape)
            out[k] = torch.where(touched.reshape(shape), by_row, out[k])
    return out


def delta_from_sums(
    total: Mapping[str, torch.Tensor],
    rule: str,
    item_state: Mapping[str, torch.Tensor],
    normalize_steps: bool,
    ials_alpha: float,
    reg: float,
    sum_clip: float = 0.0,
) -> dict[str, torch.Tensor]:
    """The round's delta under any rule, for both runtimes: sums divided by sums, or ALS's item step
    solved from the summed terms (a delta that lands the table on the solution). `ials_alpha` and
    `reg` are the ials loss's (local.ials_alpha, local.user_solve_reg); only the als rules read them.
    `sum_clip` > 0 bounds each row of the averaged delta (`sum_clip.clip_rows_of_sum`)."""
    if rule == ALS:
        return item_step_delta(total, item_state, reg)
    if rule == ALS_DP:
        return noisy_als.noisy_item_step_delta(total, item_state, ials_alpha, reg)
    delta = aggregate_sums(total, rule, normalize_steps)
    return clip_rows_of_sum(delta, sum_clip) if sum_clip else delta


def mean_loss(total: Mapping[str, torch.Tensor]) -> float:
    """The round's training loss, weighted by training positives (a sum over a sum too)."""
    return float(total[LOSS] / total[WEIGHT])
