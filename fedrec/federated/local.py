"""The local update: what one merchant computes in a round, as a pure function.

In: the received item tower, the merchant's private user embeddings (and, when the model has
one, its private item bias) and purchase matrix.
Out: the item-tower delta with its weights (n_k, steps, which rows had purchases), from which
`aggregation.merchant_sums` makes the message, and the new private tensors (kept at home).
The in-process simulation and a networked client both call exactly this.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from fedrec.errors import ConfigError
from fedrec.features import ItemFeatures, features_on
from fedrec.federated.ials_item_step import item_step_terms
from fedrec.federated.token_rows import TABLE as TOKEN_TABLE
from fedrec.federated.token_rows import TokenRows, token_rows
from fedrec.ials_users import solve_ials_users
from fedrec.losses import bpr_loss, ials_loss, sampled_softmax_loss, softmax_loss
from fedrec.model import ItemTower, ModelConfig, id_table_rows, id_vectors, tower_from_state
from fedrec.privacy import noisy_als
from fedrec.privacy.accountant import DPMechanism
from fedrec.privacy.closed_form import (
    FEAT,
    TABLE,
    basket_weights,
    clipped_softmax_content_sums,
    clipped_softmax_table_sums,
)
from fedrec.privacy.dp_sgd import (
    CHUNK,
    add_noise,
    clipped_gradient_sums,
    noisy_mean,
    padded_baskets,
    poisson_sample,
)
from fedrec.softmax_foldin import solve_user_vectors, solve_user_vectors_sampled

# The per-round user solve refines last round's vectors rather than solving from zero: two Newton
# steps, each Hessian from the 64 most probable items (the gradient stays exact). Its effect on
# quality was measured with exactly these settings (README, "User solve").
USER_SOLVE_STEPS = 2
USER_SOLVE_HESSIAN = 64
BIAS = "__merchant_item_bias__"  # the private item bias among the tensors a customer's gradient covers


@dataclass(frozen=True)
class LocalConfig:
    epochs: int = 1
    batch_size: int = 256
    lr: float = 0.005  # Adam, item tower
    user_lr: float = 0.02  # Adam, user embeddings
    weight_decay: float = 0.1  # L2 on the rows used in a batch
    bias_lr: float = 0.05  # Adam, the merchant's own item bias (model.merchant_item_bias)
    loss: str = "softmax"
    # Scores are divided by it before the softmax. 0: settings chosen on the validation slice among
    # `candidates`, else among `temperature_candidates` (`simulation.run_federated`): the best value
    # measured from 0.5 (MovieLens) to 2 (a sparse shop without product metadata), so no one fixed
    # value fits every shop's file (README, "A new shop's file").
    temperature: float = 0.5
    temperature_candidates: tuple[float, ...] = (0.5, 1.0, 2.0)
    # With temperature 0, whole setting sets to choose between instead of the temperatures, e.g.
    # ({"local.temperature": 2.0}, {"local.loss": "ials", "local.temperature": 1.0, "model.dim": 16});
    # each overrides this run's settings (`fedrec/federated/candidates.py`).
    candidates: tuple[dict[str, Any], ...] = ()
    # FedProx (Li et al., 2020): (mu / 2) |w - w_received|^2 on the item tower keeps a merchant's
    # local steps near the model it received, against drift on skewed data; 0 is plain FedAvg.
    prox_mu: float = 0.0
    # Start each round from every customer's MAP user vector under the received item tower
    # (`solve_user_vectors`, Newton on the softmax loss with this L2 weight), then train as usual:
    # one local epoch of Adam leaves a user table under-fit. 0 is off. 3.0 was chosen on the
    # validation slices of both shipped datasets (README, "User solve").
    user_solve_reg: float = 3.0
    # Above this many catalogue items, "softmax" steps use sampled softmax instead, and the user
    # solve the same sampled softmax (what each chunk of customers bought plus uniform negatives,
    # `solve_user_vectors_sampled`) with weight `sampled_user_solve_reg`: the full forms cost
    # O(catalogue) per step, the sampled ones O(batch). Chosen by measurement (`make bench-train`,
    # README "Scale").
    full_softmax_max_items: int = 20_000
    # The user solve's weight above `full_softmax_max_items` (0 is off), chosen on the validation
    # slice of a generated 62,572-product marketplace (`make bench-train TRAIN_PARTS=user_solve`).
    sampled_user_solve_reg: float = 10.0
    # Above the switch, a popularity prior w log(1 + buyers) added to the released model's scores,
    # with w chosen on the validation slice among these (`fedrec/federated/popularity_prior.py`);
    # () is off. The grid runs from none to mostly popularity.
    sampled_popularity_weights: tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0)
    # Sampled softmax: this many uniformly drawn negatives per step besides the in-batch ones
    # (mixed negative sampling); 0 is in-batch only. Chosen by measurement (README, "Scale").
    uniform_negatives: int = 1024
    # loss = "ials": the weight of a purchase is 1 + ials_alpha against 1 for every other item
    # (implicit's alpha); the user solve is then ALS's exact user step with user_solve_reg as reg.
    ials_alpha: float = 5.0
    ials_lr: float = 10.0  # SGD step size of the tower's embedding tables under ials (per-purchase mean loss)
    # The item side under ials: "sgd" steps of size ials_lr on the tower's tables, or "exact": ALS's
    # item step, solved by the coordinator from the merchants' summed normal-equation terms with
    # user_solve_reg as reg, for an id-only tower (`fedrec/federated/ials_item_step.py`).
    ials_item_step: str = "sgd"
    # Where the local steps run: "cpu" (the default; CI never needs a GPU) or "cuda" / "cuda:N".
    # Everything the update returns is on the CPU either way; DP runs on the CPU only.
    device: str = "cpu"


@dataclass(frozen=True)
class LocalResult:
    """Everything here stays at the merchant; only `aggregation.merchant_sums` of it is sent."""

    delta: dict[str, torch.Tensor]  # new minus received value of every item-tower tensor
    num_examples: int  # training positives used (n_k)
    num_steps: int  # local optimiser steps behind `delta` (tau_k, for FedNova)
    touched_rows: torch.Tensor  # bool per catalogue item: the merchant had a training positive
    user_embeddings: torch.Tensor
    mean_loss: float
    item_bias: torch.Tensor | None = None  # private, like user_embeddings
    # The exact ials item step's terms (`ials_item_step.item_step_terms`), sent instead of a delta
    # (then empty); None for every other update.
    item_terms: dict[str, torch.Tensor] | None = None


def purchase_shares(train: sp.csr_matrix) -> torch.Tensor:
    """Per customer, 1 / their purchases: each purchase's share of its customer's all-items term
    under the ials loss (`losses.ials_loss`), so a pass over the purchases counts each customer once."""
    return 1.0 / torch.from_numpy(np.diff(train.indptr)).clamp(min=1).float()


def catalogue_refuses(cfg: LocalConfig, n_items: int) -> str | None:
    """Why `cfg` cannot train on a catalogue of `n_items`, else None: ials's SGD item step has no
    sampled form (every step runs the tower over the whole catalogue). The exact item step runs it
    once a round, with no softmax to sample, so the switch does not bar it (`bench-train`'s
    `als_exact` part runs it on 62,572 products)."""
    if cfg.loss == "ials" and cfg.ials_item_step != "exact" and n_items > cfg.full_softmax_max_items:
        return (
            f"local.loss = 'ials' with SGD item steps runs over the whole catalogue every step: at most "
            f"{cfg.full_softmax_max_items} items (local.ials_item_step = 'exact' has no such limit)"
        )
    return None


def _batch_loss(
    tower: ItemTower,
    features: ItemFeatures,
    u: torch.Tensor,
    pos: torch.Tensor,
    cfg: LocalConfig,
    log_q: torch.Tensor,
    gen: torch.Generator,
    bias: torch.Tensor | None,
    share: torch.Tensor | None,
) -> torch.Tensor:
    if cfg.loss == "ials":
        v = tower(features)
        b_pos, vb, bb = (bias[pos], bias @ v, bias.pow(2).sum()) if bias is not None else (0.0, 0.0, 0.0)
        return ials_loss(u, v[pos], v.T @ v, share, cfg.ials_alpha, b_pos, vb, bb)
    if cfg.loss == "softmax":
        return softmax_loss(u, tower(features), pos, cfg.temperature, bias)
    if cfg.loss == "sampled_softmax":
        if not cfg.uniform_negatives:
            return sampled_softmax_loss(u, tower(features, pos), pos, log_q, cfg.temperature, bias)
        neg = torch.randint(features.n_items, (cfg.uniform_negatives,), generator=gen).to(pos.device)
        v = tower(features, torch.cat([pos, neg]))
        return sampled_softmax_loss(
            u, v[: len(pos)], pos, log_q, cfg.temperature, bias, v[len(pos) :], neg, features.n_items
        )
    if cfg.loss == "bpr":
        neg = torch.randint(features.n_items, pos.shape, generator=gen).to(pos.device)
        v = tower(features, torch.cat([pos, neg]))
        b_pos, b_neg = (bias[pos], bias[neg]) if bias is not None else (0.0, 0.0)
        return bpr_loss(u, v[: len(pos)], v[len(pos) :], b_pos, b_neg)
    raise ValueError(f"unknown loss {cfg.loss!r}")


def proximal_term(tower: ItemTower, received: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx: (mu / 2) times the squared distance of the tower from the one the merchant received."""
    return 0.5 * mu * sum((p - received[name]).pow(2).sum() for name, p in tower.named_parameters())


def _trained_part(
    item_state: dict[str, torch.Tensor], features: ItemFeatures, model_cfg: ModelConfig, dev: torch.device, cut: bool
) -> tuple[dict[str, torch.Tensor], ItemFeatures, ModelConfig, TokenRows | None]:
    """The state, features and model config a local update trains, on `dev`: with `cut` (no DP),
    only the token rows the catalogue uses (DP noises every row, used or not)."""
    rows = token_rows(features, model_cfg) if cut else None
    if rows is not None:
        item_state, features, model_cfg = rows.cut(item_state), rows.features, rows.model_cfg
    return {k: v.to(dev) for k, v in item_state.items()}, features_on(features, dev), model_cfg, rows


def solves_whole_catalogue(cfg: LocalConfig, n_items: int, dp: DPMechanism | None) -> bool:
    """Whether `local_update` starts from the user solve over the whole catalogue (`_solve_users`);
    above the switch, without DP, it solves over samples instead."""
    sampled = n_items > cfg.full_softmax_max_items and (
        cfg.loss == "sampled_softmax" or (cfg.loss == "softmax" and dp is None)
    )
    return bool(cfg.user_solve_reg) and not sampled


@torch.no_grad()
def round_vectors(
    item_state: dict[str, torch.Tensor],
    features: ItemFeatures,
    model_cfg: ModelConfig,
    cfg: LocalConfig,
    dp: DPMechanism | None = None,
) -> np.ndarray | None:
    """The received tower's vectors over the whole catalogue (float64) that `local_update`'s user
    solve reads, or None where it does not solve over the whole catalogue.

    Every merchant of a round receives the same tower, so a runtime that runs many merchants
    computes these once a round and passes them to each update (`vectors`): the same numbers bit
    for bit (tested), one forward pass over the catalogue a round instead of one per merchant.
    """
    if not solves_whole_catalogue(cfg, features.n_items, dp):
        return None
    state, features, model_cfg, _ = _trained_part(item_state, features, model_cfg, torch.device(cfg.device), dp is None)
    return _catalogue_vectors(tower_from_state(features.n_items, model_cfg, state), features)


@torch.no_grad()
def _catalogue_vectors(tower: ItemTower, features: ItemFeatures) -> np.ndarray:
    """Every product's vector (float64, on the CPU): what the whole-catalogue user solve reads."""
    return tower(features).double().cpu().numpy()


def local_update(
    item_state: dict[str, torch.Tensor],
    user_embeddings: torch.Tensor,
    train: sp.csr_matrix,
    features: ItemFeatures,
    model_cfg: ModelConfig,
    cfg: LocalConfig,
    seed: int,
    item_bias: torch.Tensor | None = None,
    dp: DPMechanism | None = None,
    user_groups: np.ndarray | None = None,
    release: int = 1,
    vectors: np.ndarray | None = None,
) -> LocalResult:
    """Train the received item tower, the local user table (and item bias) for `cfg.epochs` on `train`.

    With `dp`, the steps are customer-level DP-SGD (`_private_steps`), and what the result exposes
    to the coordinator is public: weight 1, the scheduled number of steps, no loss.
    A grouped item bias (one row per merchant, `user_groups` naming each customer's row) is the
    centralized baseline's: it needs the softmax loss and no DP. `release`: under DP-ALS with a
    count bias, which of this merchant's rounds this is (1-based; its counts' running mean); under
    any DP, the round whose noise multiplier the schedule gives (`DPMechanism.at_round`).
    `vectors`: `round_vectors` of `item_state`, where the caller has them (None: computed here).
    """
    if cfg.temperature <= 0:
        raise ValueError("local_update needs local.temperature > 0 (0, chosen on validation, is run_federated's)")
    large = features.n_items > cfg.full_softmax_max_items
    if large and cfg.loss == "softmax" and dp is None:
        cfg = dataclasses.replace(cfg, loss="sampled_softmax")
    grouped = item_bias is not None and item_bias.dim() == 2
    if (why := catalogue_refuses(cfg, features.n_items)) is not None:
        raise ConfigError(why)
    if grouped and (dp is not None or cfg.loss != "softmax" or user_groups is None):
        raise ValueError("a per-merchant (grouped) item bias needs user_groups, the softmax loss and no DP")
    if cfg.device != "cpu" and not torch.cuda.is_available():
        raise ConfigError(f"local.device = {cfg.device!r}: torch sees no CUDA device on this machine; use cpu")
    if dp is not None and cfg.device != "cpu":
        raise ConfigError("customer-level DP runs on the CPU only: set local.device = 'cpu'")
    if dp is not None:
        dp = dp.at_round(release)  # this round's noise under the schedule (privacy.noise_decay)
    gen = torch.Generator().manual_seed(seed)  # on the CPU whatever the device: the same draws
    torch.manual_seed(seed)
    dev = torch.device(cfg.device)
    full_state = item_state
    item_state, features, model_cfg, cut = _trained_part(item_state, features, model_cfg, dev, dp is None)
    tower = tower_from_state(features.n_items, model_cfg, item_state)
    received = {k: v.detach() for k, v in item_state.items()}
    users = torch.nn.Parameter(user_embeddings.to(dev, copy=True))
    adam_tower, tower_opt = list(tower.parameters()), None
    if cfg.loss == "ials":
        # Under ials the tower's embedding tables take plain SGD steps, so a merchant's delta of a
        # row is its gradient and the merchants' deltas add up to the federation's. Adam would scale
        # each row's tiny all-items gradient up to a full step: every merchant that never sold a
        # product would push it away as hard as the one that sold it (validation recall@20 on the
        # new shop: 0.039 with Adam, 0.054 with SGD; README, "A new shop's file"). The MLP keeps Adam.
        tables = [m.weight for m in tower.modules() if isinstance(m, (torch.nn.Embedding, torch.nn.EmbeddingBag))]
        adam_tower = [p for p in adam_tower if all(p is not t for t in tables)]
        tower_opt = torch.optim.SGD(tables, lr=cfg.ials_lr)
    groups = [{"params": adam_tower, "lr": cfg.lr}, {"params": [users], "lr": cfg.user_lr}]
    bias = None
    if item_bias is not None:
        bias = torch.nn.Parameter(item_bias.to(dev, copy=True))
        groups.append({"params": [bias], "lr": cfg.bias_lr})
    # For a large catalogue, the fused kernel: one pass over every parameter instead of several, 4x
    # faster on CPU for a marketplace-sized tower. It differs from the default kernel in the last
    # bit, so small catalogues keep the default and reproduce earlier results exactly.
    opt = torch.optim.Adam(groups, fused=large or None)
    if solves_whole_catalogue(cfg, features.n_items, dp):  # each customer's own data: no privacy cost
        exact = cfg.loss == "ials" and cfg.ials_item_step == "exact"  # DP-ALS's count bias only ranks, as ALS's
        groups_of = user_groups if grouped else None
        vecs = _catalogue_vectors(tower, features) if vectors is None else vectors
        _solve_users(vecs, users, None if exact else bias, train, cfg, groups_of)
    elif large and cfg.loss == "sampled_softmax" and cfg.sampled_user_solve_reg:  # the sampled solve, own weight
        _solve_users_sampled(tower, users, bias, train, features, cfg, seed)
    if cfg.loss == "ials" and cfg.ials_item_step == "exact":
        return _exact_item_step(tower, users, train, features, cfg, dp, bias, gen, release)
    if dp is not None:
        if dp.noise_split:
            delta = _distributed_step(tower, users, bias, opt, train, features, cfg, dp, gen)
        else:
            _private_steps(tower, received, users, bias, opt, train, features, cfg, dp, gen)
            new_state = tower.state_dict()
            delta = {k: (new_state[k] - item_state[k]).detach() for k in item_state}
        return LocalResult(
            delta=delta,
            num_examples=1,  # n_k changes with one customer's purchases: a public weight instead
            num_steps=dp.steps_per_round,
            touched_rows=torch.zeros(features.n_items, dtype=torch.bool),  # never derived from data
            user_embeddings=users.detach(),
            mean_loss=0.0,  # the loss is a function of the purchases: not reported under DP
            item_bias=None if bias is None else bias.detach(),
        )

    coo = train.tocoo()
    rows = torch.from_numpy(coo.row.astype(np.int64)).to(dev)
    cols = torch.from_numpy(coo.col.astype(np.int64)).to(dev)
    groups = torch.from_numpy(user_groups.astype(np.int64)).to(dev) if grouped else None
    counts = np.asarray(train.sum(axis=0)).ravel() + 1.0
    share = purchase_shares(train).to(dev) if cfg.loss == "ials" else None
    log_q = torch.from_numpy(np.log(counts / counts.sum())).float().to(dev)

    losses = []
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(rows), generator=gen).to(dev)
        for start in range(0, len(rows), cfg.batch_size):
            b = perm[start : start + cfg.batch_size]
            u = users[rows[b]]
            pos = cols[b]
            batch_bias = bias[groups[rows[b]]] if grouped else bias
            batch_share = None if share is None else share[rows[b]]
            loss = _batch_loss(tower, features, u, pos, cfg, log_q, gen, batch_bias, batch_share)
            if cfg.weight_decay:
                rows_l2 = tower.id_vectors(pos).pow(2).sum(-1).mean() if model_cfg.use_item_id else 0.0
                loss = loss + cfg.weight_decay * (u.pow(2).sum(-1).mean() + rows_l2)
            if cfg.prox_mu:
                loss = loss + proximal_term(tower, received, cfg.prox_mu)
            opt.zero_grad(set_to_none=True)
            if tower_opt is not None:
                tower_opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if tower_opt is not None:
                tower_opt.step()
            losses.append(loss.detach())

    new_state = tower.state_dict()
    delta = {k: (new_state[k] - item_state[k]).detach().cpu() for k in item_state}
    if cut is not None:
        delta = cut.expand(delta, full_state[TOKEN_TABLE].shape)
    touched = torch.from_numpy(np.asarray(train.sum(axis=0)).ravel() > 0)
    return LocalResult(
        delta=delta,
        num_examples=int(train.nnz),
        num_steps=max(1, len(losses)),
        touched_rows=touched,
        user_embeddings=users.detach().cpu(),
        mean_loss=float(np.mean(torch.stack(losses).tolist())) if losses else float("nan"),
        item_bias=None if bias is None else bias.detach().cpu(),
    )


@torch.no_grad()
def _exact_item_step(
    tower: ItemTower,
    users: torch.nn.Parameter,
    train: sp.csr_matrix,
    features: ItemFeatures,
    cfg: LocalConfig,
    dp: DPMechanism | None,
    bias: torch.nn.Parameter | None,
    gen: torch.Generator,
    release: int,
) -> LocalResult:
    """The merchant's part of ALS's item step, after ALS's user step: no local SGD, only the terms
    (the loss reported is the iALS loss at the received items and the solved customers). Under DP
    (privacy.mechanism = 'als') the terms are `noisy_als`'s clipped, noised sums instead."""
    counted = dp is not None and dp.count_share > 0  # DP-ALS's bias from the merchant's noised counts
    if (bias is not None) != counted or not cfg.user_solve_reg:
        raise ConfigError(
            "local.ials_item_step = 'exact' needs local.user_solve_reg > 0 and no item bias (under DP-ALS: an item "
            "bias exactly when privacy.count_share > 0)"
        )
    if dp is not None and dp.mechanism != "als":
        raise ConfigError("local.ials_item_step = 'exact' under DP needs privacy.mechanism = 'als'")
    u = users.detach().cpu()
    if dp is not None:  # bounded, noised sums; what the merchant exposes besides them is public
        terms = noisy_als.clipped_terms(u.numpy(), train, dp.clip, dp.max_purchases)
        sums = noisy_als.noised_terms(terms, dp.clip, dp.max_purchases, dp.share_multiplier, gen, dp.count_share)
        if counted:  # the counts take the whole noise: they stay here, unsummed, and other lists read them
            fresh = noisy_als.noised_counts(terms, dp.clip, dp.max_purchases, dp.count_share, dp.noise_multiplier, gen)
            counts = noisy_als.averaged_counts(bias.detach().cpu(), fresh, dp.count_weight, release, dp.noise_decay)
            bias = noisy_als.count_bias(counts, dp.count_weight)
        return LocalResult(
            delta={},
            num_examples=1,
            num_steps=1,
            touched_rows=torch.zeros(features.n_items, dtype=torch.bool),
            user_embeddings=u,
            mean_loss=0.0,
            item_terms=sums,
            item_bias=bias,
        )
    coo = train.tocoo()
    rows, cols = torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))
    v = tower(features).cpu()
    share = purchase_shares(train)
    loss = ials_loss(u[rows], v[cols], v.T @ v, share[rows], cfg.ials_alpha) if len(rows) else torch.tensor(0.0)
    return LocalResult(
        delta={},
        num_examples=int(train.nnz),
        num_steps=1,
        touched_rows=torch.from_numpy(np.asarray(train.sum(axis=0)).ravel() > 0),
        user_embeddings=u,
        mean_loss=float(loss),
        item_terms=item_step_terms(u.numpy(), train, cfg.ials_alpha),
    )


@torch.no_grad()
def _solve_users(
    vecs: np.ndarray,
    users: torch.nn.Parameter,
    bias: torch.nn.Parameter | None,
    train: sp.csr_matrix,
    cfg: LocalConfig,
    user_groups: np.ndarray | None,
) -> None:
    """Replace every customer's vector by its MAP solve against the catalogue's vectors `vecs`
    (`_catalogue_vectors`, or a round's `round_vectors`); a grouped bias: one solve per group."""
    if cfg.loss == "ials":  # ALS's exact user step, for the customers with purchases
        bought = np.flatnonzero(np.diff(train.indptr))
        offsets = None if bias is None else bias.double().cpu().numpy()
        solved = solve_ials_users(vecs, train[bought], cfg.ials_alpha, cfg.user_solve_reg, offsets)
        users.data[torch.from_numpy(bought).to(users.device)] = torch.from_numpy(solved).to(users)
        return
    start = users.detach().double().cpu().numpy()  # last round's vectors: a warm start
    if user_groups is None:
        groups = [(np.arange(train.shape[0]), bias)]
    else:
        groups = [(np.flatnonzero(user_groups == g), bias[g]) for g in np.unique(user_groups)]
    for members, offsets in groups:
        rows, solved = solve_user_vectors(
            vecs, train[members], cfg.temperature, cfg.user_solve_reg,
            None if offsets is None else offsets.double().cpu().numpy(), start[members], USER_SOLVE_STEPS,
            USER_SOLVE_HESSIAN,
        )  # fmt: skip
        users.data[torch.from_numpy(members[rows]).to(users.device)] = torch.from_numpy(solved).to(users)


def ials_user_step(
    item_state: dict[str, torch.Tensor],
    users: torch.Tensor,
    train: sp.csr_matrix,
    features: ItemFeatures,
    model_cfg: ModelConfig,
    cfg: LocalConfig,
    vectors: np.ndarray | None = None,
) -> torch.Tensor:
    """ALS's user step against `item_state` (each customer from their own purchases, at home).

    After the coordinator's exact item step the table a merchant's customers were solved against
    is gone: run this on the new one, so the users the merchant validates, keeps and serves with
    belong to the table released with them (ALS ends on a user step too). `vectors`: as in
    `local_update`."""
    if vectors is None:  # a tower only to compute them
        vectors = _catalogue_vectors(tower_from_state(features.n_items, model_cfg, item_state), features)
    fresh = torch.nn.Parameter(users.clone())
    _solve_users(vectors, fresh, None, train, cfg, None)
    return fresh.detach()


@torch.no_grad()
def _solve_users_sampled(
    tower: ItemTower,
    users: torch.nn.Parameter,
    bias: torch.nn.Parameter | None,
    train: sp.csr_matrix,
    features: ItemFeatures,
    cfg: LocalConfig,
    seed: int,
) -> None:
    """Above `full_softmax_max_items`: each chunk of customers solved over what they bought plus
    uniform negatives (`solve_user_vectors_sampled`), with weight `cfg.sampled_user_solve_reg`."""
    dev = features.tokens.device

    def vectors(ids: np.ndarray) -> np.ndarray:
        return tower(features, torch.from_numpy(ids).to(dev)).double().cpu().numpy()

    rows, solved = solve_user_vectors_sampled(
        vectors, train, features.n_items, cfg.temperature, cfg.sampled_user_solve_reg, cfg.uniform_negatives,
        np.random.default_rng(seed), users.detach().double().cpu().numpy(),
        None if bias is None else bias.double().cpu().numpy(), USER_SOLVE_STEPS, USER_SOLVE_HESSIAN,
    )  # fmt: skip
    users.data[torch.from_numpy(rows).to(users.device)] = torch.from_numpy(solved).to(users)


def item_vectors_functional(
    params: dict[str, torch.Tensor], features: ItemFeatures, model_cfg: ModelConfig
) -> torch.Tensor:
    """`ItemTower.forward` over the whole catalogue as a function of its parameters.

    The content mean is an embedding lookup and a masked mean rather than EmbeddingBag, whose
    backward has no vmap batching rule (per-customer gradients would fall back to a loop).
    """
    out = torch.zeros(())
    if model_cfg.use_content:
        tokens = features.tokens
        keep = (tokens != model_cfg.hash_buckets).to(params["feat_emb.weight"].dtype)
        emb = F.embedding(tokens, params["feat_emb.weight"])
        mean = (emb * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1)
        hidden = F.relu(F.linear(mean, params["mlp.0.weight"], params["mlp.0.bias"]))
        out = F.linear(hidden, params["mlp.2.weight"], params["mlp.2.bias"])
    if model_cfg.use_item_id:
        out = out + id_vectors(params, torch.arange(features.n_items), id_table_rows(features.n_items, model_cfg))
    return out


def softmax_customer_loss(features: ItemFeatures, model_cfg: ModelConfig, temperature: float, weight_decay: float):  # noqa: ANN201
    """One customer's DP loss as a function of the shared tensors: what DP-SGD clips, per customer.

    The mean over their purchases of -log softmax, plus the weight decay on their user vector and
    on the id rows of what they bought.
    """
    id_rows = id_table_rows(features.n_items, model_cfg)

    def customer_loss(
        shared: dict[str, torch.Tensor], u: torch.Tensor, pos: torch.Tensor, m: torch.Tensor
    ) -> torch.Tensor:
        vecs = item_vectors_functional(shared, features, model_cfg)
        scores = vecs @ u
        if BIAS in shared:
            scores = scores + shared[BIAS]
        logp = F.log_softmax(scores / temperature, dim=0)
        w = m.to(u.dtype) / m.sum().clamp(min=1)
        loss = -(logp[pos] * w).sum()
        if weight_decay:
            rows_l2 = (id_vectors(shared, pos, id_rows).pow(2).sum(-1) * w).sum() if model_cfg.use_item_id else 0.0
            loss = loss + weight_decay * (u.pow(2).sum() + rows_l2)
        return loss

    return customer_loss


def clipped_customer_sums(
    shared: dict[str, torch.Tensor],
    features: ItemFeatures,
    model_cfg: ModelConfig,
    temperature: float,
    weight_decay: float,
    users: torch.Tensor,
    pos: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The sampled customers' clipped gradient sums of `softmax_customer_loss`, computed cheaply.

    The same numbers as vmap over the whole tower (tested): in closed form
    (`fedrec.privacy.closed_form`) for towers with one id row per product, and by vmap for the
    compositional id tables of large catalogues. Returns (sums keyed like `shared`, user grads,
    norms before clipping).
    """
    if "item_emb_q.weight" in shared:
        loss = softmax_customer_loss(features, model_cfg, temperature, weight_decay)
        return clipped_gradient_sums(shared, loss, users, pos, mask, clip)
    weights = basket_weights(pos, mask, features.n_items)
    if FEAT not in shared:
        table, sums = shared[TABLE], {}
        sums[TABLE], bias_sum, user_grads, norms = clipped_softmax_table_sums(
            table, shared.get(BIAS), users, weights, temperature, weight_decay, clip
        )
        if bias_sum is not None:
            sums[BIAS] = bias_sum
        return sums, user_grads, norms
    sums = {k: torch.zeros_like(v) for k, v in shared.items()}
    user_grads, norms = [users.new_zeros((0, users.shape[1]))], [users.new_zeros(0)]
    for start in range(0, len(users), CHUNK):  # bounds the B x n x hidden activations
        sl = slice(start, start + CHUNK)
        part, g, n = clipped_softmax_content_sums(
            shared, BIAS, features.tokens, model_cfg.hash_buckets, users[sl], weights[sl],
            temperature, weight_decay, clip,
        )  # fmt: skip
        for k in sums:
            sums[k] += part[k]
        user_grads.append(g)
        norms.append(n)
    return sums, torch.cat(user_grads), torch.cat(norms)


def _private_batch(
    tower: ItemTower,
    users: torch.nn.Parameter,
    bias: torch.nn.Parameter | None,
    indptr: torch.Tensor,
    indices: torch.Tensor,
    features: ItemFeatures,
    cfg: LocalConfig,
    dp: DPMechanism,
    gen: torch.Generator,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One Poisson batch of customers: (batch, clipped gradient sums of the shared tensors, user grads)."""
    batch = poisson_sample(len(indptr) - 1, dp.sample_rate, gen)
    pos, mask = padded_baskets(indptr, indices, batch)
    shared = {k: p.detach() for k, p in tower.named_parameters()}
    if bias is not None:
        shared[BIAS] = bias.detach()
    sums, user_grads, _ = clipped_customer_sums(
        shared, features, tower.cfg, cfg.temperature, cfg.weight_decay, users.detach()[batch], pos, mask, dp.clip
    )
    return batch, sums, user_grads


def _csr_tensors(train: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(train.indptr.astype(np.int64)), torch.from_numpy(train.indices.astype(np.int64))


def _distributed_step(
    tower: ItemTower,
    users: torch.nn.Parameter,
    bias: torch.nn.Parameter | None,
    opt: torch.optim.Optimizer,
    train: sp.csr_matrix,
    features: ItemFeatures,
    cfg: LocalConfig,
    dp: DPMechanism,
    gen: torch.Generator,
) -> dict[str, torch.Tensor]:
    """This merchant's part of one DP-SGD step whose noise is split across merchants.

    Returns the tower delta to send: minus (the sampled customers' clipped gradient sum + this
    merchant's noise share); the coordinator's optimiser steps on the mean over merchants. The
    merchant's own item bias never leaves it, but its served recommendations read it, and no other
    merchant's share is added to it: it takes the whole noise, and its step here.
    """
    batch, sums, user_grads = _private_batch(tower, users, bias, *_csr_tensors(train), features, cfg, dp, gen)
    names = [k for k, _ in tower.named_parameters()]
    shares = add_noise({k: sums[k] for k in names}, dp, gen, std=dp.share_std)
    opt.zero_grad(set_to_none=True)
    if bias is not None:
        bias.grad = add_noise({BIAS: sums[BIAS]}, dp, gen)[BIAS] / (dp.sample_rate * train.shape[0])
    users.grad = torch.zeros_like(users)
    users.grad[batch] = user_grads
    opt.step()  # the user table and the bias only: the tower's parameters have no gradient
    return {k: -v for k, v in shares.items()}


def _private_steps(
    tower: ItemTower,
    received: dict[str, torch.Tensor],
    users: torch.nn.Parameter,
    bias: torch.nn.Parameter | None,
    opt: torch.optim.Optimizer,
    train: sp.csr_matrix,
    features: ItemFeatures,
    cfg: LocalConfig,
    dp: DPMechanism,
    gen: torch.Generator,
) -> None:
    """Customer-level DP-SGD: the softmax loss of each sampled customer, over their own purchases.

    One customer's loss is the mean over their purchases of -log softmax (plus the weight decay
    on their user vector and on the id rows of what they bought), so what one customer adds to
    the shared gradient is bounded by clipping, whatever the length of their history.
    """
    params = dict(tower.named_parameters())
    indptr, indices = _csr_tensors(train)
    n_customers = train.shape[0]
    for _ in range(dp.steps_per_round):
        batch, sums, user_grads = _private_batch(tower, users, bias, indptr, indices, features, cfg, dp, gen)
        grads = noisy_mean(sums, dp, dp.sample_rate * n_customers, gen)
        opt.zero_grad(set_to_none=False)
        for k, p in params.items():
            p.grad = grads[k]
            if cfg.prox_mu:  # FedProx's pull is data-independent: added after the noise
                p.grad = p.grad + cfg.prox_mu * (p.detach() - received[k])
        if bias is not None:
            bias.grad = grads[BIAS]
        users.grad = torch.zeros_like(users)
        users.grad[batch] = user_grads
        opt.step()
