"""The coordinator's ServerApp for Flower: the federated loop over the network, from sums only.

Each exchange sends the item tower and a stage to the round's merchants and gets back one total:
under SecAgg+ (`SecAggPlusWorkflow`) Flower unmasks only the sum of the merchants' replies; with
it off the coordinator adds the replies itself after checking each one. Either way the loop then
does what the in-process runtime does, with the same pure functions: `delta_from_sums`, the
server optimiser, best-round tracking on the validation sums. The merchants' validation sums for
the model of round r arrive with the replies of round r + 1 (one exchange per round, no extra
trip); a last `validate` exchange scores the final model; with `federation.refit` the `refit`
exchanges retrain from the start on train + validation for the best round's number of rounds;
and `finish` collects the test sums and has every merchant write its private half of the export.

After every completed round (of training or of the refit) the coordinator writes `checkpoint.pt`
atomically, so a restarted coordinator resumes after the last completed round: none is lost and
none is applied twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from flwr.app import ConfigRecord
from flwr.common import Code, Context, FitIns, FitRes, Message, MessageType, ndarrays_to_parameters
from flwr.common import parameters_to_ndarrays as to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerApp, ServerConfig, SimpleClientManager
from flwr.server.compat.app_utils import start_update_client_manager_thread
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

from fedrec import served_weight
from fedrec.atomic import write_with
from fedrec.config import RunConfig, aggregation_rule, check_networked, load_config
from fedrec.content_match import basis_rows, content_basis
from fedrec.errors import ConfigError, FedrecError
from fedrec.features import ItemFeatures, build_item_features
from fedrec.federated import content_choice, popularity_prior
from fedrec.federated.aggregation import delta_from_sums, mean_loss, sum_all
from fedrec.federated.groups import MIN_GROUP, MIN_GROUPS, assign_groups
from fedrec.federated.merchant_node import split_catalogue
from fedrec.federated.protocol import stage_format, state_to_arrays
from fedrec.federated.robust import robust_delta
from fedrec.federated.server_opt import ServerOptimizer
from fedrec.federated.simulation import refits, trains_on_validation
from fedrec.federated.wire import (
    TEST_PREFIX,
    TEST_USERS,
    VAL_HITS,
    VAL_USERS,
    WireFormat,
    check_arrays,
    from_wire,
    sum_arrays,
)
from fedrec.metrics import METRICS
from fedrec.model import initial_item_state, tower_state
from fedrec.privacy.accountant import plan_mechanism, privacy_entry, rounds_within_budget
from fedrec.serving.export_store import next_version
from fedrec.threads import use_threads
from fedrec.training.export import export_catalogue, new_items_entry, publish, write_shared_export
from fedrec.training.train import read_checkpoint

log = logging.getLogger("flwr").getChild("fedrec")  # shown in the run's log stream (flwr run --stream)


class SumsStrategy(Strategy):
    """Thin shell: picks the round's merchants and hands back the round's total, nothing else."""

    def __init__(
        self, fraction: float, min_merchants: int, secagg: bool, wait_s: float, max_merchants: int = 10**9
    ) -> None:
        self.fraction, self.min_merchants, self.secagg, self.wait_s = fraction, min_merchants, secagg, wait_s
        self.max_merchants = max_merchants  # SecAgg+: quantization_range x merchants must stay below 2**32
        self.config: dict = {}
        self.group: list | None = None  # with federation.robust_groups: this exchange's merchants, sampled already
        self.fmt: WireFormat | None = None
        self.total: list[np.ndarray] | None = None
        self.contributors = 0

    def initialize_parameters(self, client_manager):  # noqa: ANN001, ANN201
        return None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        clients = self.group if self.group is not None else self.sample(client_manager)
        return [(c, FitIns(parameters, dict(self.config))) for c in clients]

    def sample(self, client_manager) -> list:  # noqa: ANN001
        """The round's merchants: a `fraction` of those connected, at least `min_merchants` (else none)."""
        if not client_manager.wait_for(self.min_merchants, timeout=int(self.wait_s)):
            log.error(
                "round refused: %d merchant(s) connected, at least %d needed (network.min_merchants)%s",
                client_manager.num_available(),
                self.min_merchants,
                "; SecAgg+ never falls back to sending updates in the clear" if self.secagg else "",
            )
            return []
        available = client_manager.num_available()
        k = min(available, self.max_merchants, max(self.min_merchants, math.ceil(self.fraction * available)))
        return client_manager.sample(k, min_num_clients=self.min_merchants)

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201
        for f in failures:
            log.warning("round %s: a merchant failed: %s", server_round, _describe(f))
        assert self.fmt is not None
        if self.secagg:
            # SecAgg+ hands every result the same unmasked vector: the mean of the masked replies
            # (each with weight 1). Times their number it is the sum; no single reply is visible.
            if not results:
                return None, {}
            mean = to_ndarrays(results[0][1].parameters)
            total = [np.asarray(a, dtype=np.float64) * len(results) for a in mean]
            if not all(np.isfinite(a).all() for a in total):
                log.error("round %s: the secure sum holds NaN/Inf; round rejected", server_round)
                return None, {}
            self.total, self.contributors = total, len(results)
            return None, {}
        good = []
        for proxy, res in results:
            arrays = to_ndarrays(res.parameters)
            try:
                check_arrays(arrays, self.fmt)
            except ValueError as exc:
                log.warning("round %s: rejected the update of node %s: %s", server_round, proxy.node_id, exc)
                continue
            good.append(arrays)
        if len(good) < self.min_merchants:
            log.error("round %s: %d valid update(s), at least %d needed", server_round, len(good), self.min_merchants)
            return None, {}
        self.total, self.contributors = sum_arrays(good), len(good)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, ANN201
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001, ANN201
        return None


def _describe(failure: object) -> str:
    if isinstance(failure, tuple) and len(failure) == 2:
        proxy, res = failure
        return f"node {proxy.node_id}: {getattr(res, 'status', res)}"
    return str(failure)


def plaintext_fit(timeout: float):  # noqa: ANN201
    """One exchange without SecAgg: send, wait up to `timeout`, hand every reply to the strategy."""

    def workflow(grid, context: LegacyContext) -> None:  # noqa: ANN001
        rnd = int(context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND])
        params = compat.arrayrecord_to_parameters(context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
        instructions = context.strategy.configure_fit(rnd, params, context.client_manager)
        if not instructions:
            return
        proxies = {p.node_id: p for p, _ in instructions}
        out = [
            Message(
                compat.fitins_to_recorddict(ins, True),
                dst_node_id=p.node_id,
                message_type=MessageType.TRAIN,
                group_id=str(rnd),
            )
            for p, ins in instructions
        ]
        replies = list(grid.send_and_receive(out, timeout=timeout))
        results: list[tuple] = []
        failures: list = []
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                failures.append(Exception(f"node {node}: {msg.error.reason}"))
                continue
            res: FitRes = compat.recorddict_to_fitres(msg.content, keep_input=False)
            (results if res.status.code == Code.OK else failures).append((proxies[node], res))
        missing = len(out) - len(replies)
        if missing:
            failures.append(Exception(f"{missing} merchant(s) did not answer within {timeout:.0f}s"))
        context.strategy.aggregate_fit(rnd, results, failures)

    return workflow


def payload_bytes(content) -> int:  # noqa: ANN001
    """Bytes of a message's arrays and config values (the payload; HTTP/protobuf framing excluded)."""
    total = 0
    for rec in content.array_records.values():
        total += sum(len(arr.data) for arr in rec.values())
    for rec in content.config_records.values():
        for value in rec.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(v) if isinstance(v, bytes | str) else 8 for v in items)
    return total


# How often the ServerApp asks the SuperLink for replies. Flower's own `send_and_receive` waits 3 s
# between pulls, so each message of a round (four under SecAgg+) waited 1.5 s on average after its
# last reply had arrived; a pull is one small request to the SuperLink on the same machine.
REPLY_POLL_SECONDS = 0.1


def pull_replies(grid, messages: list[Message], timeout: float | None, poll_s: float) -> list[Message]:  # noqa: ANN001
    """Flower's `Grid.send_and_receive` (push, then pull until every reply is in or `timeout`
    passes), through the Grid's public push and pull calls, pulling every `poll_s` seconds."""
    pending = set(grid.push_messages(messages))
    end = time.monotonic() + (timeout if timeout is not None else 0.0)
    replies: list[Message] = []
    while timeout is None or time.monotonic() < end:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(m.metadata.reply_to_message_id for m in got)
        if not pending:
            break
        time.sleep(poll_s)
    return replies


class AuditGrid:
    """Counts what the coordinator sends and receives; in audit mode also keeps every reply.
    Every exchange of the run goes through it, so it also pulls the replies (`pull_replies`).

    Recording plays an honest-but-curious coordinator for the leakage test: it keeps exactly what
    Flower's ServerApp receives from each node (under SecAgg+, key shares, ciphertexts and masked
    vectors; without it, the plain sums).
    """

    def __init__(self, grid, record: Path | None = None) -> None:  # noqa: ANN001
        self.grid, self.record = grid, record
        self.sent = self.received = 0
        if record is not None:
            record.mkdir(parents=True, exist_ok=True)

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.grid, name)

    def send_and_receive(self, messages, timeout=None):  # noqa: ANN001, ANN201
        messages = list(messages)
        self.sent += sum(payload_bytes(m.content) for m in messages)
        replies = pull_replies(self.grid, messages, timeout, REPLY_POLL_SECONDS)
        for msg in replies:
            if msg.has_error():
                continue
            self.received += payload_bytes(msg.content)
            if self.record is not None:
                self._keep(msg)
        return replies

    def _keep(self, msg) -> None:  # noqa: ANN001
        arrays = {}
        for rec_name, rec in msg.content.array_records.items():
            for key, arr in rec.items():
                arrays[f"array/{rec_name}/{key}"] = arr.numpy()
        for rec_name, rec in msg.content.config_records.items():
            for key, value in rec.items():
                if isinstance(value, list) and value and isinstance(value[0], bytes):
                    arrays[f"config/{rec_name}/{key}"] = np.array(value, dtype=object)
        seq = len(list(self.record.iterdir()))
        np.savez(self.record / f"node{msg.metadata.src_node_id}-round{msg.metadata.group_id}-{seq}.npz", **arrays)


@dataclass
class Checkpoint:
    """The coordinator's state after the last completed round (written atomically)."""

    config_hash: str
    run_key: str  # names the merchants' state directories for this run (kept across restarts)
    round: int = 0
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    m: dict[str, torch.Tensor] = field(default_factory=dict)
    v: dict[str, torch.Tensor] = field(default_factory=dict)
    best_val: float = -1.0
    best_round: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    stopped: bool = False
    # The refit on train + validation (federation.refit), after the early-stopped run: its own
    # model, server-optimiser state and completed rounds, so a restart resumes it too.
    refit_round: int = 0
    refit_state: dict[str, torch.Tensor] = field(default_factory=dict)
    refit_m: dict[str, torch.Tensor] = field(default_factory=dict)
    refit_v: dict[str, torch.Tensor] = field(default_factory=dict)
    refit_history: list[dict] = field(default_factory=list)


def config_hash(cfg: RunConfig) -> str:
    """Resuming is only allowed with the config the checkpoint was made with."""
    d = cfg.to_dict()
    d.pop("network", None)  # timeouts and SecAgg settings may change across a restart
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def load_checkpoint(path: Path, cfg: RunConfig) -> Checkpoint | None:
    if not path.is_file():
        return None
    saved = read_checkpoint(path, ("config_hash", "run_key"))
    try:
        ck = Checkpoint(**saved)
    except TypeError as exc:  # a key this version does not know: another version's or tool's file
        raise FedrecError(f"{path}: not this version's coordinator checkpoint ({exc}); move it away") from None
    if ck.config_hash != config_hash(cfg):
        raise FedrecError(f"{path}: made with another config; move it away to start a new run")
    return ck


def save_checkpoint(path: Path, ck: Checkpoint) -> None:
    write_with(path, lambda tmp: torch.save(vars(ck), tmp))


@dataclass
class Coordinator:
    grid: object
    context: LegacyContext
    strategy: SumsStrategy
    fit_workflow: object
    cfg: RunConfig
    n_items: int
    run_key: str

    def exchange(
        self,
        stage: str,
        rnd: int,
        state: dict[str, torch.Tensor],
        arrays: Sequence[np.ndarray] = (),
        **extra: object,
    ) -> dict | None:
        """Send `state` (and `arrays` after it) and the stage to the round's merchants; the total of
        their replies, or None."""
        fmt = stage_format(stage, self.n_items, self.cfg)
        self.strategy.fmt, self.strategy.total, self.strategy.contributors = fmt, None, 0
        self.strategy.config = {
            "stage": stage,
            "round": rnd,
            "fedrec-config": json.dumps(self.cfg.to_dict()),
            "run-key": self.run_key,
            **{k.replace("_", "-"): v for k, v in extra.items()},
        }
        self.context.state.config_records[MAIN_CONFIGS_RECORD][Key.CURRENT_ROUND] = rnd
        self.context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters([*state_to_arrays(state), *arrays]), keep_input=True
        )
        self.fit_workflow(self.grid, self.context)
        if self.strategy.total is None:
            return None
        return from_wire(self.strategy.total, fmt)

    def exchange_groups(
        self, stage: str, rnd: int, state: dict[str, torch.Tensor], **extra: object
    ) -> list[dict] | None:
        """`federation.robust_groups`: the round's merchants split into random groups
        (`groups.assign_groups`, ordered by node id), one exchange each, so that under SecAgg+ the
        coordinator decodes one sum per group and no merchant's own reply; the groups' totals, or
        None when fewer than `groups.MIN_GROUPS` of them answered."""
        strategy, fed = self.strategy, self.cfg.federation
        clients = sorted(strategy.sample(self.context.client_manager), key=lambda c: c.node_id)
        try:
            groups = assign_groups(len(clients), fed.robust_groups, fed.seed, rnd)
        except ConfigError as exc:  # too few merchants answered the sampling to fill the groups
            log.error("round %s refused: %s", rnd, exc)
            return None
        totals, contributors = [], 0
        try:
            for idx in groups:
                strategy.group = [clients[i] for i in idx]
                total = self.exchange(stage, rnd, state, **extra)
                if total is None:
                    log.warning("round %s: a group of %d merchants did not answer; left out", rnd, len(idx))
                    continue
                totals.append(total)
                contributors += strategy.contributors
        finally:
            strategy.group = None
        strategy.contributors = contributors
        if len(totals) < MIN_GROUPS:
            log.error("round %s: %d group sum(s), at least %d needed", rnd, len(totals), MIN_GROUPS)
            return None
        return totals

    def train_exchange(
        self, stage: str, rnd: int, state: dict[str, torch.Tensor], **extra: object
    ) -> list[dict] | None:
        """A training exchange: one total (the sum form), or one per group (`exchange_groups`)."""
        if self.cfg.federation.robust_groups:
            return self.exchange_groups(stage, rnd, state, **extra)
        total = self.exchange(stage, rnd, state, **extra)
        return None if total is None else [total]

    def round_delta(self, totals: list[dict], state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The round's delta from its totals, as in-process: `delta_from_sums` of the one total, or
        the robust rule over the group sums."""
        cfg, fed = self.cfg, self.cfg.federation
        if fed.robust_groups:
            return robust_delta(totals, fed.robust, fed.normalize_steps, fed.trim, fed.clip_multiple)
        return delta_from_sums(
            totals[0], aggregation_rule(cfg, self.n_items), state, fed.normalize_steps, cfg.local.ials_alpha,
            cfg.local.user_solve_reg, fed.sum_clip,
        )  # fmt: skip


def _what_coordinator_sees(secagg: bool, groups: int) -> str:
    if not secagg:
        return "each merchant's update (no secure aggregation)"
    if groups:
        return (
            f"only sums over groups of a round's merchants ({groups} random groups a round, at least {MIN_GROUP} each)"
        )
    return "only sums over a round's merchants"


def _val(total: dict) -> float:
    users = float(total[VAL_USERS])
    return float(total[VAL_HITS]) / users if users > 0 else float("nan")


def _answered(
    coord: Coordinator, stage: str, rnd: int, state: dict[str, torch.Tensor], what: str, **extra: object
) -> tuple[dict, dict[str, torch.Tensor], float]:
    """A training exchange's total and the round's delta, retried while too few merchants (or
    groups) answer, up to `network.max_failed_rounds` attempts in a row; and when the answered
    attempt started."""
    attempts = max(1, coord.cfg.network.max_failed_rounds)  # 0 stops at the first failure, as 1 does
    for _ in range(attempts):
        t0 = time.perf_counter()
        totals = coord.train_exchange(stage, rnd, state, **extra)
        if totals is not None:
            return sum_all(totals), coord.round_delta(totals, state), t0
    raise FedrecError(f"{what} failed {attempts} times in a row; stopping (see the log above)")


def _refit(coord: Coordinator, ck: Checkpoint, ck_path: Path, n_items: int) -> dict[str, torch.Tensor]:
    """The refit (`federation.refit`, as `simulation.refit_federated`): from the same start, the
    merchants train on train + validation for the `best_round` rounds validation chose; the last
    is released. Each completed round is checkpointed; Flower round numbers continue after the
    validate exchange, the merchants count the refit's own rounds (their seeds)."""
    cfg, fed = coord.cfg, coord.cfg.federation
    if not ck.refit_state:
        ck.refit_state = initial_item_state(n_items, cfg.model, fed.seed)
    server = ServerOptimizer(fed.server, ck.refit_m, ck.refit_v)
    while ck.refit_round < ck.best_round:
        r = ck.refit_round + 1
        total, delta, t0 = _answered(
            coord, "refit", ck.round + 1 + r, ck.refit_state, f"refit round {r}", refit_round=r
        )
        ck.refit_state = server.step(ck.refit_state, delta)
        ck.refit_m, ck.refit_v, ck.refit_round = server.m, server.v, r
        entry = {"round": r, "merchants": coord.strategy.contributors, "loss": mean_loss(total)}
        ck.refit_history.append({**entry, "seconds": time.perf_counter() - t0})
        save_checkpoint(ck_path, ck)
        log.info("refit round %d of %d: %d merchants, loss %.4f", r, ck.best_round, entry["merchants"], entry["loss"])
    return ck.refit_state


def _choose_prior(
    coord: Coordinator, ck: Checkpoint, rnd: int, with_validation: bool
) -> tuple[popularity_prior.PopularityPrior, np.ndarray]:
    """A large catalogue's popularity prior, as `simulation.with_popularity_prior` chooses it: the
    merchants' summed buyer counts, then their summed validation sums of the early-stopped model
    under each candidate weight. Returns the choice and the counts its offsets use in the released
    model (train + validation after a refit)."""
    weights = coord.cfg.local.sampled_popularity_weights
    counts = coord.exchange("buyers", rnd, ck.best_state)
    if counts is None:
        raise FedrecError("the prior's counts exchange failed; rerun to retry it")
    # counts are integers: rounding undoes SecAgg+'s quantisation (under 0.1 a merchant)
    buyers = {k: np.rint(counts[k].double().numpy()) for k in (popularity_prior.BUYERS, popularity_prior.BUYERS_FULL)}
    sums = coord.exchange("prior", rnd + 1, ck.best_state, [buyers[popularity_prior.BUYERS]], best_round=ck.best_round)
    if sums is None:
        raise FedrecError("the prior's validation exchange failed; rerun to retry it")
    weight, scores = popularity_prior.choose_from_sums(sums, weights)
    released = buyers[popularity_prior.BUYERS_FULL if with_validation else popularity_prior.BUYERS]
    chosen = popularity_prior.PopularityPrior(weight, scores, popularity_prior.prior_offsets(released, weight))
    log.info("popularity prior: weight %g chosen on validation recall@20 %s", weight, scores)
    return chosen, released


def _choose_content(
    coord: Coordinator, ck: Checkpoint, rnd: int, features: ItemFeatures
) -> tuple[content_choice.ContentMatch, torch.Tensor | None]:
    """The content match, as `simulation.with_content_match` chooses it: the basis from the
    catalogue (public), sent to the merchants (its shared tokens' rows) with the early-stopped
    model; their summed validation sums under each candidate weight choose it. Returns the choice
    and its basis (None: no content)."""
    basis = content_basis(features, coord.cfg.model.content_match_dim)
    if basis is None:
        return content_choice.ContentMatch(0.0, {}, 0), None
    sums = coord.exchange("content", rnd, ck.best_state, [basis_rows(basis, features)], best_round=ck.best_round)
    if sums is None:
        raise FedrecError("the content match's validation exchange failed; rerun to retry it")
    weight, scores = content_choice.choose_from_sums(sums, coord.cfg.model.content_match_weights)
    log.info("content match: weight %g chosen on validation recall@20 %s", weight, scores)
    return content_choice.ContentMatch(weight, scores, int(basis.shape[1])), basis


def run_coordinator(grid, context: Context, cfg: RunConfig, workdir: Path, catalogue: Path) -> dict:  # noqa: ANN001
    """The whole networked run; returns the model card's summary (also printed to the log)."""
    use_threads(cfg.threads)
    items, new_items = split_catalogue(pl.read_parquet(catalogue))
    features = build_item_features(items, cfg.model.hash_buckets)
    net, fed = cfg.network, cfg.federation
    check_networked(cfg)
    # SecAgg+ adds each merchant's value in [0, quantization_range) modulo 2**32: more merchants would overflow
    cap = (2**32 - 1) // net.quantization_range if net.secagg else 10**9
    strategy = SumsStrategy(fed.fraction, net.min_merchants, net.secagg, net.round_timeout, cap)
    legacy = LegacyContext(context, ServerConfig(num_rounds=fed.rounds), strategy, SimpleClientManager())
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: 0, Key.START_TIME: time.time()})
    if net.secagg:
        fit = SecAggPlusWorkflow(
            num_shares=float(net.num_shares),
            reconstruction_threshold=float(net.reconstruction_threshold),
            max_weight=1.0,
            clipping_range=net.clipping_range,
            quantization_range=net.quantization_range,
            timeout=net.round_timeout,
        )
    else:
        fit = plaintext_fit(net.round_timeout)
    thread, stop, ready = start_update_client_manager_thread(grid, legacy.client_manager)
    ready.wait()
    ck_path = workdir / "checkpoint.pt"
    ck = load_checkpoint(ck_path, cfg)
    if ck is None:
        init = initial_item_state(features.n_items, cfg.model, fed.seed)
        ck = Checkpoint(config_hash(cfg), secrets.token_hex(8), state=init, best_state=init)
    else:
        log.info("resuming after round %d (best round %d)", ck.round, ck.best_round)
    coord = Coordinator(grid, legacy, strategy, fit, cfg, features.n_items, ck.run_key)
    server = ServerOptimizer(fed.server, ck.m, ck.v)
    try:
        dp = plan_mechanism(cfg.privacy, fed.rounds, cfg.local.epochs)
        max_rounds = fed.rounds if dp is None else rounds_within_budget(dp, fed.rounds)
        rule = aggregation_rule(cfg, features.n_items)
        while not ck.stopped and ck.round < max_rounds:
            rnd = ck.round + 1
            total, delta, t0 = _answered(coord, "train", rnd, ck.state, f"round {rnd}", best_round=ck.best_round)
            val_prev = _val(total)  # the received model's, i.e. round rnd - 1's
            if rnd > 1 and val_prev > ck.best_val:
                ck.best_val, ck.best_round, ck.best_state = val_prev, rnd - 1, ck.state
            ck.state = server.step(ck.state, delta)
            ck.m, ck.v, ck.round = server.m, server.v, rnd
            entry = {
                "round": rnd,
                "merchants": strategy.contributors,
                "loss": mean_loss(total),
                "val_recall_at_20_previous_round": val_prev,
                "seconds": time.perf_counter() - t0,
            }
            ck.history.append(entry)
            if fed.patience and dp is None and rnd - 1 - ck.best_round >= fed.patience and ck.best_round > 0:
                ck.stopped = True
            save_checkpoint(ck_path, ck)
            log.info(
                "round %d: %d merchants, loss %.4f, val recall@20 of round %d %.4f, %.2fs",
                rnd,
                strategy.contributors,
                entry["loss"],
                rnd - 1,
                val_prev,
                entry["seconds"],
            )
        last = coord.exchange("validate", ck.round + 1, ck.state)
        if last is not None and _val(last) > ck.best_val:
            ck.best_val, ck.best_round, ck.best_state = _val(last), ck.round, ck.state
        if dp is not None:  # release the last round: a choice by validation is outside the accountant
            ck.best_round, ck.best_state = ck.round, ck.state
        save_checkpoint(ck_path, ck)
        released, refit_rounds = ck.best_state, 0
        if refits(fed, dp, ck.best_round):
            released, refit_rounds = _refit(coord, ck, ck_path, features.n_items), ck.best_round
        exports = workdir / "exports"
        version = next_version(exports)
        prior, finish_arrays, finish_set = None, (), {}
        rnd = ck.round + 2 + refit_rounds
        if popularity_prior.applies(cfg.local, features.n_items, dp is not None):
            prior, buyers = _choose_prior(coord, ck, rnd, refit_rounds > 0)
            finish_arrays, finish_set, rnd = [buyers], {"prior_weight": prior.weight}, rnd + 2
        match = None
        if content_choice.applies(cfg.model, features.n_items, cfg.local.full_softmax_max_items, dp is not None):
            if dp is None:
                match, basis = _choose_content(coord, ck, rnd, features)
                rnd += 0 if basis is None else 1
            else:  # a fixed weight: no exchange, nothing read from validation
                match, basis = content_choice.fixed(features, cfg.model)
            if basis is not None and match.weight > 0:  # the nodes add their profiles; the export's vectors get z
                finish_arrays, finish_set = [basis_rows(basis, features)], {"content_weight": match.weight}
                released = content_choice.with_match(released, basis, match.weight)
        if served_weight.applies(cfg.model, features.n_items, cfg.local.full_softmax_max_items, dp is not None):
            # each node chooses its served popularity weight with the early-stopped tower: after a
            # refit it is not the released one, so it is sent last; without one it is the same
            if refit_rounds:
                finish_arrays = [*finish_arrays, *state_to_arrays(ck.best_state)]
            finish_set = {**finish_set, "served": 1}
        test = coord.exchange(
            "finish", rnd, tower_state(released), finish_arrays,
            best_round=ck.best_round, version=version,
            refit_rounds=refit_rounds, **finish_set,
        )  # fmt: skip
        # the card's count of rounds on train + validation: the refit's, or under DP every round (the
        # nodes trained on it from the first; the finish exchange's refit_rounds stays 0 for them)
        on_validation = ck.round if trains_on_validation(fed, dp is not None) else refit_rounds
        if test is None:
            raise FedrecError("the finish exchange failed: no test sums, no merchant exports; rerun to retry it")
        users = float(test[TEST_USERS])
        overall = {m: float(test[TEST_PREFIX + m]) / users for m in METRICS}
        card = {
            "dataset": "federation",
            "runtime": "flower_secagg" if net.secagg else "flower",
            "rounds": ck.round,
            "best_round": ck.best_round,
            # > 0: the released model was retrained for this many rounds on train + validation (under
            # DP: trained on train + validation from the start, for every round)
            "refit_rounds": on_validation,
            "refit_history": ck.refit_history,
            "best_val_recall@20": ck.best_val,
            "metrics": {"test": overall, "users": users},
            "history": ck.history,
            "federation": {**cfg.to_dict()["federation"], "aggregation": rule},
            "network": cfg.to_dict()["network"],
            "new_items": new_items_entry(cfg),
            "popularity_prior": None
            if prior is None
            else prior.entry("buyers per product, summed over merchants, through the secure sum where it is on"),
            "content_match": None if match is None else match.entry(),
            "privacy": {
                "shared": "item tower only (item-id embeddings, content-token embeddings, MLP)",
                "user_embeddings": "kept by each merchant on its own node; never sent",
                "coordinator_sees": _what_coordinator_sees(net.secagg, fed.robust_groups),
                "secure_aggregation": (
                    {
                        "protocol": "SecAgg+ (Flower)",
                        "min_merchants": net.min_merchants,
                        "clipping_range": net.clipping_range,
                        "quantization_range": net.quantization_range,
                    }
                    if net.secagg
                    else False
                ),
                "differential_privacy": privacy_entry(dp, ck.round),
            },
            "config": cfg.to_dict(),
        }
        # the released model: the refit's last round, or the best round without a refit
        served, vecs = export_catalogue(cfg, items, new_items, released)
        write_shared_export(exports, version, cfg, served, released, vecs, card)
        publish(exports, version)
        log.info(
            "final test recall@20 %.4f (best round %d, refit rounds %d); export %s",
            overall["recall@20"],
            ck.best_round,
            on_validation,
            exports / version,
        )
        return {
            "version": version,
            "test": overall,
            "best_round": ck.best_round,
            "rounds": ck.round,
            "refit_rounds": on_validation,
            "runtime": card["runtime"],
            "history": ck.history,
            "refit_history": ck.refit_history,
        }
    finally:
        stop.set()
        thread.join()


app = ServerApp()


@app.main()
def main(grid, context: Context) -> None:  # noqa: ANN001
    """Run config (from `flwr run --run-config`): fedrec-config, overrides (JSON), workdir, catalogue."""
    rc = context.run_config
    overrides = json.loads(str(rc.get("overrides", "") or "{}"))
    cfg = load_config(str(rc.get("fedrec-config", "")) or None, overrides)
    workdir = Path(str(rc["workdir"]))
    workdir.mkdir(parents=True, exist_ok=True)
    record = str(rc.get("record-dir", ""))
    audit = AuditGrid(grid, Path(record) if record else None)
    summary = run_coordinator(audit, context, cfg, workdir, Path(str(rc["catalogue"])))
    train_rounds = [h for h in summary["history"] if h["round"] > 0]
    summary["bytes_sent"], summary["bytes_received"] = audit.sent, audit.received
    # the train rounds, validate, the refit's rounds, finish
    summary["exchanges"] = len(train_rounds) + 2 + len(summary["refit_history"])
    summary["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (workdir / "last_run.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
