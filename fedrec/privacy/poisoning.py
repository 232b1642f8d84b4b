"""Item promotion by a fake merchant: the poisoning attack of `fedrec attack-report`.

The attacker joins the federation as one more merchant. Its customers are made up: each "bought"
the target product and a few of the most popular ones, so training on them pulls the target's
vector towards where real customers' vectors point (the fake co-purchase idea of Fang et al.,
2018, and of PipAttack, Zhang et al., 2022). It trains on that data with `local_update`, then
replaces its update of the target's id row by a crafted one (it knows the tower it received) and
boosts its message: every term times `factor`, as if it had that many times the purchases.
Under FedAvg (and rowwise, whose row terms it crafts alike) its delta then outweighs the honest
merchants (model replacement, Bagdasaryan et al., 2020), and nothing in a sum can tell: under
secure aggregation the coordinator sees only the total.

Success is the target's exposure: the share of real customers whose top-k holds it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.data import MerchantData
from fedrec.evaluation import recommendation_lists
from fedrec.federated.aggregation import DELTA, ROW_DELTA, STEPS, WEIGHT
from fedrec.federated.token_rows import TABLE as TOKEN_TABLE
from fedrec.model import ID_TABLE

Tamper = Callable[[str, dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def fake_merchant(
    n_items: int,
    target: int,
    popular: np.ndarray,
    customers: int,
    filler: int,
    seed: int,
    name: str = "mallory",
) -> MerchantData:
    """A merchant whose every customer bought `target` and `filler` products drawn from `popular`.

    It has no validation or test purchases: it takes no part in choosing the best round and is
    never scored.
    """
    rng = np.random.default_rng(seed)
    picks = np.stack([rng.choice(popular, size=filler, replace=False) for _ in range(customers)])
    rows = np.repeat(np.arange(customers), filler + 1)
    cols = np.concatenate([np.full((customers, 1), target), picks], axis=1).ravel()
    train = sp.csr_matrix((np.ones(len(cols), dtype=np.float32), (rows, cols)), shape=(customers, n_items))
    empty = sp.csr_matrix((customers, n_items), dtype=np.float32)
    user_ids = np.array([f"{name}/{i}" for i in range(customers)])
    return MerchantData(name, user_ids, train, empty, empty.copy())


def promote(
    attacker: str,
    target: int,
    popular: np.ndarray,
    factor: float,
    normalize_steps: bool,
    strength: float = 20.0,
    seed: int = 0,
    camouflage: float = 0.0,
    table: str = ID_TABLE,
    direction: str = "fresh",
    tokens: torch.Tensor | None = None,
) -> Tamper:
    """A `run_federated` tamper hook: the attacker's message with a crafted target row, boosted.

    The attacker's delta for the target's id row is replaced by the step that moves the row to
    `strength` times the longest other row of the received table, along a fresh random direction
    each round, pre-weighted as an honest merchant would weight it; then every term is multiplied
    by `factor`. Other merchants' messages pass unchanged.

    Why a fresh direction: honest merchants re-fit their customers' vectors to the tower they
    receive, so a long target row along a fixed direction (we tried the popular products' mean)
    was learnt away (their customers did not buy it), while a new direction each round is scored
    high by part of the customers fitted to the last one (measured: `make attack-report`). With the merchant item bias
    on, popularity lives in each merchant's own bias, out of the attacker's reach.

    `camouflage` > 0 is an attacker that knows a similarity defence (`row_clip_foolsgold`): to
    every row of its delta but the target's it adds noise of its own (not shared with colluders),
    `camouflage` times that row's norm, so that colluders' updates look unalike while their push
    on the target's row stays the same.

    `direction` is where the crafted row points: "fresh" (above), "fixed" (one random direction
    drawn in the first round and kept, so a bounded push adds up round after round) or "popular"
    (the mean of the received rows of the `popular` products each round: where most customers'
    vectors point, so the target scores high for many of them). The last two are attacks adapted
    to a bound on each row (`row_clip`): the bound cuts each round's step, not its persistence.

    `tokens` (the target's token ids, padding excluded) is an attacker that also pushes through
    the content tower: the target's token rows are moved so that its content vector points the same
    way (`pushed_token_rows`), each row at most `strength` times the longest other token row. A
    bound on each row then bounds each of these rows on its own, so the push adds up over them. A
    token other products share moves them too.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction {direction!r}: choose one of {', '.join(DIRECTIONS)}")
    kept: list[torch.Tensor] = []  # "fixed": the direction drawn in the first round

    rng = torch.Generator().manual_seed(seed)
    own = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(attacker.encode()))

    def tamper(name: str, terms: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if name != attacker:
            return terms
        if "item_emb_q.weight" in state:  # compositional ids (fedrec/model.py)
            raise ValueError("the promotion attack crafts one product's own id row: compositional ids have none")
        rows = state[table]
        if direction == "popular":
            pointing = rows[torch.as_tensor(popular)].mean(dim=0)
        elif direction == "fixed" and kept:
            pointing = kept[0]
        else:
            pointing = torch.randn(rows.shape[1], generator=rng)
            if direction == "fixed":
                kept.append(pointing)
        others = torch.cat([rows[:target], rows[target + 1 :]]).norm(dim=1).max()
        goal = strength * others * pointing / pointing.norm()
        n, tau = terms[WEIGHT], terms[STEPS] / terms[WEIGHT]
        weight = n / tau if normalize_steps else n  # as an honest merchant pre-weights its delta
        crafted = terms[DELTA + table].clone()
        crafted[target] = weight * (goal - rows[target])
        sent = {**terms, DELTA + table: crafted}
        keep = {DELTA + table: torch.tensor([target])}  # the rows camouflage leaves as they are
        if tokens is not None and len(tokens):  # a product without content tokens has none to push
            token_ids = torch.unique(tokens)
            moved = pushed_token_rows(state, tokens, pointing, strength)
            by_token = terms[DELTA + TOKEN_TABLE].clone()
            by_token[token_ids] = weight * (moved - state[TOKEN_TABLE][token_ids])
            sent[DELTA + TOKEN_TABLE] = by_token
            keep[DELTA + TOKEN_TABLE] = token_ids
        if camouflage > 0:
            sent = {k: _camouflaged(v, camouflage, own, keep.get(k)) if k.startswith(DELTA) else v
                    for k, v in sent.items()}  # fmt: skip
        out = {k: v * factor for k, v in sent.items()}
        if ROW_DELTA + table in terms:  # rowwise: its customers bought the target, so the row is its own
            by_row = terms[ROW_DELTA + table].clone()
            by_row[target] = crafted[target]
            out[ROW_DELTA + table] = by_row * factor
        return out

    return tamper


DIRECTIONS = ("fresh", "fixed", "popular")  # where `promote`'s crafted target row points


def pushed_token_rows(
    state: dict[str, torch.Tensor], tokens: torch.Tensor, pointing: torch.Tensor, strength: float, steps: int = 50
) -> torch.Tensor:
    """The rows of `torch.unique(tokens)` moved so that the content vector they make (the tower's
    MLP over their mean) has the largest component along `pointing`, each row within `strength`
    times the longest other token row: projected gradient ascent from the received rows.

    The MLP is not linear, so the attacker climbs rather than solves; it knows the received tower,
    as every merchant does."""
    table = state[TOKEN_TABLE]
    rows, slots = torch.unique(tokens, return_inverse=True)
    others = torch.ones(len(table), dtype=torch.bool)
    others[rows] = False
    bound = strength * table[others].norm(dim=1).max()
    unit = pointing / pointing.norm()
    w1, b1, w2, b2 = (state[f"mlp.{k}"] for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    x = table[rows].clone()
    with torch.enable_grad():
        for _ in range(steps):
            x.requires_grad_(True)
            content = torch.relu(x[slots].mean(dim=0) @ w1.T + b1) @ w2.T + b2
            (grad,) = torch.autograd.grad(content @ unit, x)
            with torch.no_grad():
                x = x + (bound / 10) * grad / grad.norm().clamp_min(1e-12)
                x = x * torch.clamp(bound / x.norm(dim=1, keepdim=True).clamp_min(1e-12), max=1.0)
    return x.detach()


def _camouflaged(v: torch.Tensor, scale: float, rng: torch.Generator, keep: torch.Tensor | None) -> torch.Tensor:
    """`v` plus noise whose every row has `scale` times that row's norm (a 1-D tensor is one row);
    the rows `keep`, if any, unchanged."""
    rows = v.reshape(1, -1) if v.dim() <= 1 else v.flatten(1)
    noise = torch.randn(rows.shape, generator=rng, dtype=rows.dtype)
    noise *= scale * rows.norm(dim=1, keepdim=True) / noise.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if keep is not None:
        noise[keep] = 0
    return v + noise.reshape(v.shape)


def colluding(hooks: list[Tamper]) -> Tamper:
    """One tamper hook from several attackers' hooks (each changes only its own merchant's message)."""

    def tamper(name: str, terms: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for hook in hooks:
            terms = hook(name, terms, state)
        return terms

    return tamper


def exposure(
    merchants: list[MerchantData],
    users: dict[str, torch.Tensor],
    item_vecs: torch.Tensor,
    item_biases: dict[str, torch.Tensor | None] | None,
    target: int,
    k: int = 20,
) -> float:
    """Share of the merchants' test customers whose top-k (past purchases excluded) holds `target`."""
    lists = recommendation_lists(merchants, users, item_vecs, item_biases, k)
    return float((lists == target).any(axis=1).mean())
