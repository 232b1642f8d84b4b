"""The federated loop, in-process runtime: every merchant runs in this process, in turn.

Per round: sample merchants, send each the item tower, run `local_update`; each merchant turns
its result into its terms of the round's sums (`merchant_sums`), which are added up as they
arrive (a running sum, as secure aggregation would compute it); the coordinator divides sums by
sums (`delta_from_sums`) and applies the server optimiser; then the merchants' validation metric
sums are added up the same way. The best round (validation recall@20) is kept (early stopping).
Each merchant's private tensors (user table, optional item bias) live in dicts keyed by
merchant that only that merchant's `local_update` call reads or writes.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch

from fedrec import served_weight
from fedrec.data import FederatedDataset
from fedrec.errors import ConfigError
from fedrec.evaluation import MetricSums, combine_sums, evaluate_val, sample_customers
from fedrec.features import ItemFeatures
from fedrec.federated import content_choice, copurchase_choice, popularity_prior
from fedrec.federated.aggregation import (
    ITEM_STEP_RULES,
    add_sums,
    delta_from_sums,
    mean_loss,
    merchant_sums,
    resolve_rule,
    sum_names,
)
from fedrec.federated.candidates import Candidate, candidates_of, unsupported
from fedrec.federated.groups import check_groups, group_sums
from fedrec.federated.local import LocalConfig, LocalResult, ials_user_step, local_update, round_vectors
from fedrec.federated.messages import MerchantSums
from fedrec.federated.robust import robust_delta
from fedrec.federated.server_opt import ServerOptConfig, ServerOptimizer
from fedrec.federated.upload import dense_bytes, round_delta
from fedrec.model import (
    ModelConfig,
    init_item_bias,
    init_user_embeddings,
    initial_item_state,
    item_embeddings,
    item_tower_shapes,
)
from fedrec.privacy.accountant import DPMechanism, privacy_entry, rounds_within_budget

T = TypeVar("T")


# What to do when no customer has validation purchases (the protocol carves them from a customer's
# train part only when 2 or more are left there: `datasets/protocol.py`).
NO_VALIDATION = (
    "set data.val_fraction > 0 (a customer gives validation purchases only with 2 or more left for training "
    "after data.test_fraction)"
)


@dataclass(frozen=True)
class FederationConfig:
    rounds: int = 60
    fraction: float = 1.0  # share of merchants sampled each round
    min_merchants: int = 1
    aggregation: str = "auto"  # auto | fedavg | rowwise: fedrec/federated/aggregation.py
    normalize_steps: bool = True  # FedNova: see fedrec/federated/aggregation.py
    server: ServerOptConfig = field(default_factory=ServerOptConfig)
    patience: int = 10  # rounds without validation gain before stopping; 0 = never stop early
    # Validate every this many rounds (and after the last): a full ranking of every merchant's
    # validation customers costs more than a round at marketplace scale.
    val_every: int = 1
    val_customers: int = 0  # per merchant, at most this many validation customers (0: all)
    # Whose validation sums score a round: "all" merchants, or only the "round"'s sampled ones (what
    # the networked runtime does, where validation rides on the training message). With partial
    # participation at marketplace scale "all" validates ten times the merchants that train.
    val_scope: str = "all"
    upload_precision: str = "float32"  # or float16: fedrec/federated/upload.py
    # Robust aggregation against poisoning (fedrec/federated/robust.py): reads every merchant's own
    # delta, which secure aggregation hides, unless `robust_groups` (below). "none" is the sum form.
    robust: str = "none"
    trim: float = 0.2  # trimmed_mean: share of values dropped at each end, per coordinate
    # norm_clip, row_clip(_foolsgold): the bounds on a delta's (or a row's) norm and on weights, in
    # multiples of the round's medians
    clip_multiple: float = 1.0
    # >= 3: the robust rule reads the sums of this many random groups of the round's merchants (at
    # least 3 a group), not each merchant's update, so it runs under secure aggregation of each group
    # (fedrec/federated/groups.py); 0: it reads each merchant's update.
    robust_groups: int = 0
    # > 0: each row of the round's averaged delta bounded at this many times the median moving row
    # of its tensor (fedrec/federated/sum_clip.py). Reads the sum only, so it runs under secure
    # aggregation, in both runtimes; 0: off.
    sum_clip: float = 0.0
    # After early stopping has chosen the number of rounds on the validation slice, train again
    # from the same start on every purchase before the cut-off (the validation slice included) for
    # that many rounds, and release that model (`refit_federated`). The validation slice holds each
    # customer's most recent purchases, the best evidence of what they buy next; ALS and EASE train
    # on it too. Both runtimes. Under DP there is no second pass: the one DP run trains on train +
    # validation (`trains_on_validation`).
    refit: bool = True
    # In-process runtime only: merchants trained at once, on threads (torch releases the GIL in its
    # kernels; each op uses torch's own thread count, so pair workers = 2 with threads = 1 on 2
    # cores). Their messages are still added in the round's merchant order, so any number of
    # workers gives the same model bit for bit; at most `workers` updates are held at once.
    workers: int = 1
    seed: int = 0


@dataclass(frozen=True)
class RoundLog:
    round: int
    merchants: list[str]
    loss: float
    val_recall_at_20: float | None  # None: not validated this round (`val_every`)
    seconds: float
    upload_bytes: int = 0  # mean dense size of one merchant's message
    refit: bool = False  # a round of the refit on train + validation (`FederationConfig.refit`)
    candidate: str | None = None  # a choice on validation: the label of the candidate this round trains


@dataclass
class TrainResult:
    item_state: dict[str, torch.Tensor]
    user_embeddings: dict[str, torch.Tensor]
    item_biases: dict[str, torch.Tensor | None]
    history: list[RoundLog]
    best_round: int
    seconds: float
    # With customer-level DP: the mechanism and the epsilon spent (`privacy.accountant`: Opacus PRV or RDP).
    privacy: dict | None = None
    # Rounds of the refit on train + validation (`FederationConfig.refit`); 0: no refit, the
    # released model is the early-stopped one.
    refit_rounds: int = 0
    # With a refit: the early-stopped model it replaced (trained on train alone), for comparison.
    early_stopped: TrainResult | None = None
    # With local.candidates or local.temperature = 0: what validation chose, and the settings the
    # model was trained with; None: the run's own settings.
    choice: Choice | None = None
    # Above the full-softmax switch: the popularity prior validation chose, already added to
    # `item_biases` (`fedrec/federated/popularity_prior.py`); None: no prior.
    popularity: popularity_prior.PopularityPrior | None = None
    # The content match validation chose (`fedrec/federated/content_choice.py`): with a weight
    # above 0, already in `item_state` (its basis) and `user_embeddings` (w p); None: not chosen.
    content_match: content_choice.ContentMatch | None = None
    # The co-purchase term validation chose (`fedrec/federated/copurchase_choice.py`): with a weight
    # above 0, already in `item_state` (its block) and `user_embeddings` (w x); None: not chosen.
    copurchase: copurchase_choice.CoPurchase | None = None
    # Each merchant's served popularity weight, chosen on its own validation slice after training
    # (`fedrec/served_weight.py`); `item_biases` stay the trained ones. None: nothing chosen.
    served_weights: dict[str, served_weight.ServedWeight] | None = None

    @property
    def temperature(self) -> float | None:
        """The temperature validation chose; None without a choice."""
        return None if self.choice is None else self.choice.local.temperature


@dataclass(frozen=True)
class Choice:
    """A choice on validation: the kept candidate, its settings, and every candidate's validation
    recall@20 at its best round (by label; a temperature candidate's label is the temperature)."""

    label: str
    model: ModelConfig
    local: LocalConfig
    scores: dict[str, float]
    skipped: dict[str, str] = field(default_factory=dict)  # label -> why this catalogue cannot train it


def in_order(work: Callable[[str], T], names: list[str], workers: int) -> Iterator[tuple[str, T]]:
    """(name, work(name)) in the order of `names`, with up to `workers` computed at once on threads.

    The consumer adds each message to a running sum in this order, so the sum does not depend on
    the number of workers, and no more than `workers` finished updates wait in memory.
    """
    if workers <= 1:
        yield from ((name, work(name)) for name in names)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="fedrec-merchant") as pool:
        queue = iter(names)
        pending = deque((name, pool.submit(work, name)) for name in itertools.islice(queue, workers))
        while pending:
            name, future = pending.popleft()
            result = future.result()
            pending.extend((nxt, pool.submit(work, nxt)) for nxt in itertools.islice(queue, 1))
            yield name, result


def merchants_per_round(n_merchants: int, cfg: FederationConfig) -> int:
    return min(n_merchants, max(cfg.min_merchants, int(np.ceil(cfg.fraction * n_merchants))))


def sample_merchants(names: list[str], cfg: FederationConfig, rng: np.random.Generator) -> list[str]:
    k = merchants_per_round(len(names), cfg)
    return sorted(rng.choice(names, size=k, replace=False).tolist())


def check_noise_split(dp: DPMechanism | None, n_merchants: int, cfg: FederationConfig) -> None:
    """Split noise is certified only when every round's sum holds at least `noise_split` shares."""
    if dp is None or not dp.noise_split:
        return
    k = merchants_per_round(n_merchants, cfg)
    if k < dp.noise_split:
        raise ConfigError(
            f"privacy.noise_split = {dp.noise_split} needs at least that many merchants in every round's sum, "
            f"but this run sums {k} of {n_merchants}: lower privacy.noise_split or raise federation.fraction"
        )


def run_federated(
    dataset: FederatedDataset,
    features: ItemFeatures,
    model_cfg: ModelConfig,
    local_cfg: LocalConfig,
    fed_cfg: FederationConfig,
    on_round: Callable[[RoundLog], None] | None = None,
    on_message: Callable[[str, MerchantSums], None] | None = None,
    dp: DPMechanism | None = None,
    tamper: Callable[[str, dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> TrainResult:
    """Train for `fed_cfg.rounds` (or until early stopping) and return the best round's model,
    or, with `fed_cfg.refit`, the model retrained for that many rounds on train + validation.

    With `dp`, training stops when the privacy budget is spent, and the last round is released
    rather than the best one: choosing by validation would use customers' data outside the
    mechanism the accountant covers. So validation chooses nothing there, and with `fed_cfg.refit`
    the one DP run trains on train + validation, the refit's data (`trains_on_validation`).

    `tamper` (attack simulations only) may replace a merchant's terms before they are sent: what a
    malicious merchant could send, knowing the tower it received.
    """
    candidates = candidates_of(model_cfg, local_cfg)
    if candidates:
        res = choose_on_validation(dataset, features, candidates, fed_cfg, on_round, on_message, dp, tamper)
    elif trains_on_validation(fed_cfg, dp is not None):
        whole = with_validation_in_train(dataset)
        res = _train(whole, features, model_cfg, local_cfg, fed_cfg, on_round, on_message, dp, tamper, True)
        res = dataclasses.replace(res, refit_rounds=len(res.history))
    else:
        res = _train(dataset, features, model_cfg, local_cfg, fed_cfg, on_round, on_message, dp, tamper)
        if refits(fed_cfg, dp, res.best_round):
            res = refit_federated(dataset, features, model_cfg, local_cfg, fed_cfg, res, on_round, on_message, tamper)
    res = with_popularity_prior(dataset, features, model_cfg, local_cfg, fed_cfg, res, dp is not None)
    res = with_content_match(dataset, features, model_cfg, local_cfg, fed_cfg, res, dp is not None)
    res = with_copurchase(dataset, features, model_cfg, fed_cfg, res, dp is not None)
    return with_served_weights(dataset, features, model_cfg, local_cfg, res, dp is not None)


def validation_rows(dataset: FederatedDataset, fed_cfg: FederationConfig) -> dict[str, np.ndarray | None]:
    """Each merchant's validation customers (`val_customers`, seeded): early stopping and the
    popularity prior's choice score the same ones, so the prior's weight 0 scores the best round."""
    return {m.name: sample_customers(m.val, fed_cfg.val_customers, fed_cfg.seed) for m in dataset.merchants}


def to_both(res: TrainResult, add: Callable[[TrainResult, bool], TrainResult]) -> TrainResult:
    """`add` applied to the released model and to the early-stopped one it may replace. Its flag:
    whether that model trained on the validation slice (the refit), so what `add` builds from the
    merchants' data covers what that model saw, and nothing the early-stopped one is judged on."""
    early = None if res.early_stopped is None else add(res.early_stopped, False)
    return dataclasses.replace(add(res, res.refit_rounds > 0), early_stopped=early)


def with_popularity_prior(
    dataset: FederatedDataset,
    features: ItemFeatures,
    model_cfg: ModelConfig,
    local_cfg: LocalConfig,
    fed_cfg: FederationConfig,
    res: TrainResult,
    private: bool,
) -> TrainResult:
    """Above the full-softmax switch: the popularity prior's weight chosen on the validation slice
    with the early-stopped model (trained on train alone, so validation is unseen), then its
    offsets, from the buyers of the data each model trained on, added to the item biases of the
    released model and of the early-stopped one (`fedrec/federated/popularity_prior.py`)."""
    if res.choice is not None:  # the settings validation kept
        model_cfg, local_cfg = res.choice.model, res.choice.local
    if not popularity_prior.applies(local_cfg, dataset.n_items, private):
        return res
    judged = res.early_stopped or res
    val_rows = validation_rows(dataset, fed_cfg)
    weight, scores = popularity_prior.choose_weight(
        dataset.merchants, judged.user_embeddings, item_embeddings(judged.item_state, features, model_cfg),
        judged.item_biases, local_cfg.sampled_popularity_weights, val_rows,
    )  # fmt: skip

    def prior_added(run: TrainResult, with_validation: bool) -> TrainResult:
        buyers = popularity_prior.pooled_buyers(dataset.merchants, with_validation)
        offsets = popularity_prior.prior_offsets(buyers, weight)
        chosen = popularity_prior.PopularityPrior(weight, scores, offsets)
        return dataclasses.replace(
            run, item_biases=popularity_prior.with_offsets(run.item_biases, offsets), popularity=chosen
        )

    return to_both(res, prior_added)


def with_content_match(
    dataset: FederatedDataset,
    features: ItemFeatures,
    model_cfg: ModelConfig,
    local_cfg: LocalConfig,
    fed_cfg: FederationConfig,
    res: TrainResult,
    private: bool,
) -> TrainResult:
    """The content match's weight chosen on the validation slice with the early-stopped model (as
    the popularity prior's, whose offsets it scores with), then, above 0, added to the released
    model and to the early-stopped one, each with the profiles of what it trained on. Under DP only
    a fixed weight applies, and validation is not read."""
    if res.choice is not None:
        model_cfg, local_cfg = res.choice.model, res.choice.local
    if not content_choice.applies(model_cfg, dataset.n_items, local_cfg.full_softmax_max_items, private):
        return res
    judged = res.early_stopped or res
    if private:  # a fixed weight, nothing chosen
        chosen, basis = content_choice.fixed(features, model_cfg)
    else:
        chosen, basis = content_choice.choose(
            dataset.merchants, judged.user_embeddings, item_embeddings(judged.item_state, features, model_cfg),
            judged.item_biases, features, model_cfg, validation_rows(dataset, fed_cfg),
        )  # fmt: skip
    if basis is None or chosen.weight == 0:
        return to_both(res, lambda run, _: dataclasses.replace(run, content_match=chosen))

    def match_added(run: TrainResult, with_validation: bool) -> TrainResult:
        state, users = content_choice.matched(
            dataset.merchants, run.item_state, run.user_embeddings, features, basis, chosen.weight, with_validation
        )  # fmt: skip
        return dataclasses.replace(run, item_state=state, user_embeddings=users, content_match=chosen)

    return to_both(res, match_added)


def with_copurchase(
    dataset: FederatedDataset,
    features: ItemFeatures,
    model_cfg: ModelConfig,
    fed_cfg: FederationConfig,
    res: TrainResult,
    private: bool,
) -> TrainResult:
    """The co-purchase term's lam and weight chosen on the validation slice with the early-stopped
    model (with its content match), then, above 0, added to the released model and to the
    early-stopped one, each with B and the purchase rows of what it trained on. Never under DP."""
    if res.choice is not None:
        model_cfg = res.choice.model
    customers = sum(m.n_users for m in dataset.merchants)
    if not copurchase_choice.applies(model_cfg, dataset.n_items, customers, private):
        return res
    judged = res.early_stopped or res
    chosen, b = copurchase_choice.choose(
        dataset.merchants, judged.user_embeddings, item_embeddings(judged.item_state, features, model_cfg),
        judged.item_biases, model_cfg, validation_rows(dataset, fed_cfg),
    )  # fmt: skip
    if chosen.weight == 0:
        return to_both(res, lambda run, _: dataclasses.replace(run, copurchase=chosen))

    def term_added(run: TrainResult, with_validation: bool) -> TrainResult:
        state, users = copurchase_choice.added(
            dataset.merchants, run.item_state, run.user_embeddings, chosen, with_validation,
            None if with_validation else b,
        )  # fmt: skip
        return dataclasses.replace(run, item_state=state, user_embeddings=users, copurchase=chosen)

    return to_both(res, term_added)


def with_served_weights(
    dataset: FederatedDataset,
    features: ItemFeatures,
    model_cfg: ModelConfig,
    local_cfg: LocalConfig,
    res: TrainResult,
    private: bool,
) -> TrainResult:
    """Each merchant's served popularity weight, chosen on its own validation slice with the
    early-stopped model (with its content match), as the networked node chooses it at `finish`.
    Under DP nothing is chosen; nor above the full-softmax switch, where the popularity prior has
    that role and a full ranking per candidate would cost more than training."""
    if res.choice is not None:
        model_cfg, local_cfg = res.choice.model, res.choice.local
    if not served_weight.applies(model_cfg, dataset.n_items, local_cfg.full_softmax_max_items, private):
        return res
    judged = res.early_stopped or res
    chosen = served_weight.choose_all(
        dataset.merchants, judged.user_embeddings, item_embeddings(judged.item_state, features, model_cfg),
        judged.item_biases, model_cfg.served_popularity_weights, model_cfg.max_top1_share,
    )  # fmt: skip
    return dataclasses.replace(res, served_weights=chosen or None)


def choose_on_validation(
    dataset: FederatedDataset,
    features: ItemFeatures,
    candidates: list[Candidate],
    fed_cfg: FederationConfig,
    on_round: Callable[[RoundLog], None] | None = None,
    on_message: Callable[[str, MerchantSums], None] | None = None,
    dp: DPMechanism | None = None,
    tamper: Callable[[str, dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> TrainResult:
    """`local.candidates`, or `local.temperature = 0`: one early-stopped run per candidate, on train
    alone and from the same seed; the candidate whose best round scores the highest validation
    recall@20 (the merchants' validation sums, as early stopping reads them; a tie goes to the
    earlier candidate) is kept, and refit like any run. The cost is one training run per candidate.
    A candidate this run cannot train (ials over `full_softmax_max_items`, the exact item step
    under a federation it cannot use) is skipped.

    Why: how far the scores must spread (the temperature), and even which loss fits, depend on the
    shop: dense data wants a low temperature, a sparse file without product metadata implicit ALS's
    weighted squares; a new shop's file says which only on its own validation slice. Under DP the
    choice would read validation outside the accountant.
    """
    if dp is not None:
        raise ConfigError("choosing settings on validation (local.candidates, local.temperature = 0) is not "
                          "covered by DP's accountant: fix the settings")  # fmt: skip
    scores: dict[str, float] = {}
    skipped = {c.label: why for c in candidates if (why := unsupported(c, dataset.n_items, fed_cfg)) is not None}
    if len(skipped) == len(candidates):
        raise ConfigError("no candidate can train on this catalogue: " + "; ".join(skipped.values()))
    chosen, first, spent = candidates[0], None, 0.0  # only the leading run is held: each holds a whole model
    for cand in (c for c in candidates if c.label not in skipped):
        shown = None if on_round is None else (lambda h, c=cand.label: on_round(dataclasses.replace(h, candidate=c)))
        run = _train(dataset, features, cand.model, cand.local, fed_cfg, shown, on_message, None, tamper)
        best = {h.round: h.val_recall_at_20 for h in run.history}.get(run.best_round)
        if best is None:
            raise ConfigError(
                f"choosing settings on validation needs validation customers, and the slice is empty: {NO_VALIDATION}"
            )
        scores[cand.label] = best
        spent += run.seconds  # every candidate's run counts: it is what the choice cost
        if first is None or best > scores[chosen.label]:  # a tie keeps the earlier candidate
            chosen, first = cand, run
    res = first
    if refits(fed_cfg, None, first.best_round):
        res = refit_federated(dataset, features, chosen.model, chosen.local, fed_cfg, first, on_round, on_message,
                              tamper)  # fmt: skip
    spent -= first.seconds  # already in res.seconds
    choice = Choice(chosen.label, chosen.model, chosen.local, scores, skipped)
    if res.early_stopped is not None:
        res = dataclasses.replace(res, early_stopped=dataclasses.replace(res.early_stopped, choice=choice))
    return dataclasses.replace(res, seconds=res.seconds + spent, choice=choice)


def refits(fed_cfg: FederationConfig, dp: DPMechanism | None, best_round: int) -> bool:
    """Whether a run is followed by the refit: asked for, not under DP, and a round was chosen.
    Both runtimes decide by this."""
    return fed_cfg.refit and dp is None and best_round >= 1


def trains_on_validation(fed_cfg: FederationConfig, private: bool) -> bool:
    """Whether a DP run trains on train + validation from its first round (both runtimes).

    Under DP the schedule fixes the rounds and the last one is released, so a first pass on train
    alone would choose nothing for a refit to reuse: with `refit` on, the one DP run trains on what
    the refit would (each customer's most recent purchases included). The unit protected is a
    customer's whole history, so the accountant's epsilon is the same.
    """
    return private and fed_cfg.refit


def with_validation_in_train(dataset: FederatedDataset) -> FederatedDataset:
    """Every merchant's train part grown by its validation slice (which is then empty)."""
    return dataclasses.replace(dataset, merchants=[m.with_validation_in_train() for m in dataset.merchants])


def refit_federated(
    dataset: FederatedDataset,
    features: ItemFeatures,
    model_cfg: ModelConfig,
    local_cfg: LocalConfig,
    fed_cfg: FederationConfig,
    first: TrainResult,
    on_round: Callable[[RoundLog], None] | None = None,
    on_message: Callable[[str, MerchantSums], None] | None = None,
    tamper: Callable[[str, dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> TrainResult:
    """Train again from the same start, seed and schedule on train + validation for the number of
    rounds validation chose in `first`, and release the last round (there is nothing left to
    validate on). The result keeps `first`'s history and best round, which describe that choice."""
    rounds = first.best_round
    cfg = dataclasses.replace(fed_cfg, rounds=rounds, patience=0)
    whole = with_validation_in_train(dataset)
    second = _train(whole, features, model_cfg, local_cfg, cfg, on_round, on_message, None, tamper, release_last=True)
    return dataclasses.replace(
        second,
        history=first.history,
        best_round=first.best_round,
        seconds=first.seconds + second.seconds,
        refit_rounds=rounds,
        early_stopped=first,
    )


def _train(
    dataset: FederatedDataset,
    features: ItemFeatures,
    model_cfg: ModelConfig,
    local_cfg: LocalConfig,
    fed_cfg: FederationConfig,
    on_round: Callable[[RoundLog], None] | None,
    on_message: Callable[[str, MerchantSums], None] | None,
    dp: DPMechanism | None,
    tamper: Callable[[str, dict[str, torch.Tensor], dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None,
    release_last: bool = False,
) -> TrainResult:
    """The round loop. `release_last`: no validation, the last round is the result (the refit)."""
    t0 = time.perf_counter()
    check_noise_split(dp, len(dataset.merchants), fed_cfg)
    if fed_cfg.robust_groups and fed_cfg.robust != "none":
        check_groups(merchants_per_round(len(dataset.merchants), fed_cfg), fed_cfg.robust_groups)
    rounds = fed_cfg.rounds if dp is None else rounds_within_budget(dp, fed_cfg.rounds)
    names = [m.name for m in dataset.merchants]
    rng = np.random.default_rng(fed_cfg.seed)
    global_state = initial_item_state(dataset.n_items, model_cfg, fed_cfg.seed)
    shapes = item_tower_shapes(dataset.n_items, model_cfg)
    # auto -> als | rowwise | fedavg
    rule = resolve_rule(
        fed_cfg.aggregation, shapes, dp is not None, fed_cfg.robust, local_cfg.loss, local_cfg.ials_item_step
    )
    fed_cfg = dataclasses.replace(fed_cfg, aggregation=rule)
    expected = sum_names(shapes, fed_cfg.aggregation)
    # Each merchant's user table: created and kept "at home" (here: a dict keyed by merchant).
    users = {
        m.name: init_user_embeddings(m.n_users, model_cfg, torch.Generator().manual_seed(fed_cfg.seed * 7919 + i))
        for i, m in enumerate(dataset.merchants)
    }
    biases = {m.name: init_item_bias(dataset.n_items, model_cfg, m.user_groups) for m in dataset.merchants}
    server = ServerOptimizer(fed_cfg.server)
    val_rows = validation_rows(dataset, fed_cfg)
    history: list[RoundLog] = []
    best = (-1.0, 0, global_state, dict(users), dict(biases))
    for rnd in range(1, rounds + 1):
        t_round = time.perf_counter()
        chosen = sample_merchants(names, fed_cfg, rng)
        total, sent, kept = None, 0, []

        # every merchant of the round receives the same tower: its vectors for the user solve, once
        vectors = round_vectors(global_state, features, model_cfg, local_cfg, dp)

        def update(
            name: str,
            state: dict[str, torch.Tensor] = global_state,
            rnd: int = rnd,
            vectors: np.ndarray | None = vectors,
        ) -> LocalResult:
            m = dataset.merchant(name)
            seed = fed_cfg.seed * 1_000_003 + rnd * 1009 + names.index(name)
            return local_update(
                state, users[name], m.train, features, model_cfg, local_cfg, seed, biases[name], dp, m.user_groups,
                release=rnd, vectors=vectors,
            )  # fmt: skip

        for name, result in in_order(update, chosen, fed_cfg.workers):
            users[name], biases[name] = result.user_embeddings, result.item_bias
            terms = merchant_sums(
                round_delta(result.delta, fed_cfg.upload_precision),
                result.num_examples,
                result.num_steps,
                result.touched_rows,
                result.mean_loss,
                fed_cfg.aggregation,
                fed_cfg.normalize_steps,
                result.item_terms,
            )
            message = MerchantSums(terms if tamper is None else tamper(name, terms, global_state))
            message.validate(expected)
            if on_message is not None:
                on_message(name, message)
            sent += dense_bytes(message.tensors, fed_cfg.upload_precision)
            if fed_cfg.robust != "none":
                kept.append(message.tensors)
            total = add_sums(total, message.tensors)
        if kept:
            if fed_cfg.robust_groups:  # what one secure sum per group shows
                kept = group_sums(kept, fed_cfg.robust_groups, fed_cfg.seed, rnd)
            delta = robust_delta(kept, fed_cfg.robust, fed_cfg.normalize_steps, fed_cfg.trim, fed_cfg.clip_multiple)
        else:
            delta = delta_from_sums(
                total, fed_cfg.aggregation, global_state, fed_cfg.normalize_steps, local_cfg.ials_alpha,
                local_cfg.user_solve_reg, fed_cfg.sum_clip,
            )  # fmt: skip
        global_state = server.step(global_state, delta)
        if fed_cfg.aggregation in ITEM_STEP_RULES:  # ALS's user step on the new table, at every merchant
            new_vectors = round_vectors(global_state, features, model_cfg, local_cfg)

            def user_step(
                name: str, state: dict[str, torch.Tensor] = global_state, vectors: np.ndarray | None = new_vectors
            ) -> torch.Tensor:
                m = dataset.merchant(name)
                return ials_user_step(state, users[name], m.train, features, model_cfg, local_cfg, vectors)

            users.update(in_order(user_step, chosen, fed_cfg.workers))

        val_total = None
        if not release_last and (rnd % fed_cfg.val_every == 0 or rnd == rounds):
            item_vecs = item_embeddings(global_state, features, model_cfg)

            def validate(name: str, vecs: torch.Tensor = item_vecs) -> MetricSums:
                return evaluate_val(dataset.merchant(name), users[name], vecs, biases[name], val_rows[name])

            scored = names if fed_cfg.val_scope == "all" else chosen
            val = [sums for _, sums in in_order(validate, scored, fed_cfg.workers)]
            val_total = combine_sums(val).means()["recall@20"]
        seconds = time.perf_counter() - t_round
        log = RoundLog(rnd, chosen, mean_loss(total), val_total, seconds, sent // len(chosen), release_last)
        history.append(log)
        if on_round is not None:
            on_round(log)
        if dp is not None or release_last or (val_total is not None and val_total > best[0]):
            best = (val_total, rnd, global_state, dict(users), dict(biases))
        elif fed_cfg.patience and rnd - best[1] >= fed_cfg.patience:
            break
    _, best_round, best_state, best_users, best_biases = best
    privacy = privacy_entry(dp, len(history))
    return TrainResult(best_state, best_users, best_biases, history, best_round, time.perf_counter() - t0, privacy)
