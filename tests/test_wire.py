"""The networked runtime's math, without a network: wire encoding, SecAgg+ quantisation, equivalence."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from fedrec.config import aggregation_rule, load_config
from fedrec.content_match import BASIS, basis_from_rows, basis_rows, content_basis
from fedrec.errors import FedrecError
from fedrec.evaluation import evaluate_test_all
from fedrec.features import build_item_features
from fedrec.federated import content_choice, popularity_prior
from fedrec.federated.aggregation import ALS_DP, aggregate_sums, delta_from_sums, merchant_sums, sum_names
from fedrec.federated.merchant_node import MerchantNode, load_bundle, write_bundles
from fedrec.federated.protocol import stage_format, state_from_arrays, state_to_arrays
from fedrec.federated.server_opt import ServerOptimizer
from fedrec.federated.simulation import run_federated
from fedrec.federated.wire import check_arrays, from_wire, sum_arrays, to_wire, wire_format
from fedrec.model import initial_item_state, item_embeddings, item_tower_shapes, new_item_tower
from fedrec.privacy import noisy_als
from fedrec.privacy.accountant import plan_mechanism
from fedrec.served_weight import SERVED_WEIGHT_FILE
from fedrec.training.cli import default_config_path
from fedrec.training.data import load_dataset
from fedrec.training.flower_client import extra_shapes

SHAPES = {"item_emb.weight": (50, 4), "mlp.bias": (4,)}


def _toy_sums(seed: int, rule: str = "fedavg") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    delta = {k: torch.randn(*s, generator=g) * 0.01 for k, s in SHAPES.items()}
    touched = torch.rand(50, generator=g) < 0.3
    n = int(torch.randint(50, 5000, (1,), generator=g))
    return merchant_sums(delta, n, 1 + n // 256, touched, 5.0 + seed, rule, normalize_steps=True)


def _fmt(rule: str = "fedavg"):
    return wire_format(sum_names(SHAPES, rule), max_weight=10_000.0, max_steps=40.0)


@pytest.mark.parametrize("rule", ["fedavg", "rowwise"])
def test_wire_round_trip_gives_the_same_aggregate(rule: str) -> None:
    fmt = _fmt(rule)
    msgs = [_toy_sums(s, rule) for s in range(4)]
    exact = aggregate_sums({k: sum(m[k] for m in msgs) for k in msgs[0]}, rule, True)
    total = from_wire(sum_arrays([to_wire(m, fmt, 8.0) for m in msgs]), fmt)
    via_wire = aggregate_sums(total, rule, True)
    for k in exact:
        torch.testing.assert_close(via_wire[k], exact[k], rtol=1e-5, atol=1e-8)


def test_wire_refuses_out_of_range_and_non_finite_values() -> None:
    fmt = _fmt()
    sums = _toy_sums(0)
    with pytest.raises(ValueError, match="max_weight"):
        to_wire(sums, wire_format(sum_names(SHAPES, "fedavg"), max_weight=10.0, max_steps=40.0), 8.0)
    bad = dict(sums)
    bad["delta/mlp.bias"] = bad["delta/mlp.bias"].clone()
    bad["delta/mlp.bias"][0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        to_wire(bad, fmt, 8.0)


def test_coordinator_check_rejects_bad_arrays() -> None:
    fmt = _fmt()
    good = to_wire(_toy_sums(1), fmt, 8.0)
    check_arrays(good, fmt)
    i = fmt.names.index("delta/item_emb.weight")
    for bad_arr, match in (
        (good[i].astype(np.float64), "dtype"),
        (good[i][:-1], "shape"),
        (np.where(np.arange(good[i].size).reshape(good[i].shape) == 0, np.inf, good[i]).astype(np.float32), "NaN"),
    ):
        bad = list(good)
        bad[i] = bad_arr
        with pytest.raises(ValueError, match=match):
            check_arrays(bad, fmt)
    with pytest.raises(ValueError, match="expected"):
        check_arrays(good[:-1], fmt)


def test_secagg_quantisation_keeps_the_aggregate_within_tolerance() -> None:
    """Flower's own quantise/dequantise at the default range: the error SecAgg+ adds is tiny.

    Per value the step is 2 * clip / quantization_range = 16 / 2**24 ~ 1e-6 (stochastic rounding,
    unbiased); after dividing sums by sums it stays far below the deltas' own size (~1e-2).
    """
    cfg = load_config(None)
    clip, q = cfg.network.clipping_range, cfg.network.quantization_range
    fmt = _fmt()
    msgs = [to_wire(_toy_sums(s), fmt, clip) for s in range(5)]
    np.random.seed(0)
    ints = [quantize(m, clip, q) for m in msgs]
    summed = [sum(parts) for parts in zip(*ints, strict=True)]
    decoded = [a - (len(msgs) - 1) * clip for a in dequantize(summed, clip, q)]
    exact = aggregate_sums(from_wire(sum_arrays(msgs), fmt), "fedavg", True)
    secure = aggregate_sums(from_wire(decoded, fmt), "fedavg", True)
    for k in exact:
        err = (secure[k] - exact[k]).abs().max().item()
        assert err < 1e-4, (k, err)
        assert err > 0  # it really went through quantisation


@pytest.fixture(scope="module")
def synthetic_bundles(tmp_path_factory):
    cfg = load_config(default_config_path("synthetic"), {"federation.rounds": 2, "federation.patience": 0})
    ds = load_dataset(cfg.data, cfg.federation.seed)
    out = tmp_path_factory.mktemp("bundles")
    write_bundles(ds, out)
    return cfg, ds, out


def test_bundle_loader_names_the_bad_file(synthetic_bundles, tmp_path) -> None:
    _, ds, out = synthetic_bundles
    name = ds.merchants[0].name
    b = load_bundle(out / name)
    assert b.merchant.name == name and b.index == 0 and b.items.height == ds.n_items
    assert (b.merchant.train != ds.merchants[0].train).nnz == 0
    broken = tmp_path / "broken"
    shutil.copytree(out / name, broken)
    (broken / "train.npz").write_bytes(b"not a matrix")
    with pytest.raises(FedrecError, match="train.npz"):
        load_bundle(broken)
    with pytest.raises(FedrecError, match="bundle.json"):
        load_bundle(tmp_path / "nothing-here")


def _train_over_wire(nodes: list[MerchantNode], rounds: int, cfg, n_items: int) -> dict[int, dict[str, torch.Tensor]]:  # noqa: ANN001
    """The coordinator's loop without a network: each round's replies through the wire, summed, the
    delta and the server step; the model after every round."""
    fmt = stage_format("train", n_items, cfg)
    start = new_item_tower(n_items, cfg.model, cfg.federation.seed).state_dict()
    state, server, states = {k: v.clone() for k, v in start.items()}, ServerOptimizer(cfg.federation.server), {}
    for rnd in range(1, rounds + 1):
        received = state_from_arrays(state_to_arrays(state), n_items, cfg.model)
        replies = [to_wire(n.train(received, rnd, 0, fmt.expected), fmt, cfg.network.clipping_range) for n in nodes]
        total = from_wire(sum_arrays(replies), fmt)
        delta = aggregate_sums(total, aggregation_rule(cfg, n_items), cfg.federation.normalize_steps)
        state = states[rnd] = server.step(state, delta)
    return states


def _exchange(nodes: list[MerchantNode], stage: str, cfg, n_items: int, answer) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """One non-training exchange: every node's `answer(node)` through the wire, summed."""
    fmt = stage_format(stage, n_items, cfg)
    return from_wire(sum_arrays([to_wire(answer(n), fmt, cfg.network.clipping_range) for n in nodes]), fmt)


def test_networked_merchant_path_equals_the_in_process_runtime(synthetic_bundles, tmp_path) -> None:
    """Same seeds, no dropouts: the nodes' sums over the wire give the in-process model, round for round,
    in the early-stopped run and in the refit on train + validation that is released after it.

    The tolerance (3e-5) covers only float summation order: the wire carries float32 scaled sums
    added in float64, the in-process runtime adds float32 tensors merchant by merchant. Under the
    synthetic config's fedavg (since 2026-12-06) each term is n_k times a delta, so one entry in
    138,176 of the refit's table differed by 1.1e-5 (rowwise had stayed within 1e-5).
    """
    cfg, ds, out = synthetic_bundles
    features = build_item_features(ds.items, cfg.model.hash_buckets)
    inproc = run_federated(ds, features, cfg.model, cfg.local, dataclasses.replace(cfg.federation, refit=True))
    first = inproc.early_stopped
    assert first is not None and inproc.refit_rounds == first.best_round

    nodes = [MerchantNode(load_bundle(out / m.name), tmp_path / m.name, cfg) for m in ds.merchants]

    def run(stage_nodes: list[MerchantNode], rounds: int) -> dict[int, dict[str, torch.Tensor]]:
        return _train_over_wire(stage_nodes, rounds, cfg, ds.n_items)

    states = run(nodes, 2)
    assert first.history[-1].round == 2
    best = first.best_round  # the early-stopped result keeps the best round's model
    for k in states[best]:
        torch.testing.assert_close(states[best][k], first.item_state[k], rtol=1e-5, atol=3e-5)
    # the merchants' private tables after that round match too
    for n in nodes:
        users, _ = n.state_at(best)
        torch.testing.assert_close(users, trained_users(first, n.name, cfg), rtol=1e-3, atol=1e-4)

    # The refit: each node's refit twin trains on train + validation, its own state directory.
    twins = [n.refit_node() for n in nodes]
    assert all(t.bundle.merchant.train.nnz > n.bundle.merchant.train.nnz for t, n in zip(twins, nodes, strict=True))
    refit = run(twins, best)[best]
    for k in refit:
        torch.testing.assert_close(refit[k], inproc.item_state[k], rtol=1e-5, atol=3e-5)
    for t in twins:
        users, _ = t.state_at(best)
        torch.testing.assert_close(users, trained_users(inproc, t.name, cfg), rtol=1e-3, atol=1e-4)
    for n in nodes:  # the early-stopped state is untouched by the refit
        torch.testing.assert_close(n.state_at(best)[0], trained_users(first, n.name, cfg), rtol=1e-3, atol=1e-4)


def trained_users(res, name: str, cfg) -> torch.Tensor:
    """A merchant's user vectors as training left them: without the content match's block, which
    the in-process run appends after training (the nodes' training states never hold it)."""
    return res.user_embeddings[name][:, : cfg.model.dim]


def test_merchant_state_survives_restarts_and_repeated_rounds(synthetic_bundles, tmp_path) -> None:
    cfg, ds, out = synthetic_bundles
    fmt = stage_format("train", ds.n_items, cfg)
    state = new_item_tower(ds.n_items, cfg.model, 0).state_dict()
    node = MerchantNode(load_bundle(out / ds.merchants[1].name), tmp_path, cfg)
    first = node.train(state, 1, 0, fmt.expected)
    users_after_1, _ = node.state_at(1)
    # a new process (node restart) finds the same state; a repeated round 1 starts from scratch again
    again = MerchantNode(load_bundle(out / ds.merchants[1].name), tmp_path, cfg).train(state, 1, 0, fmt.expected)
    for k in first:
        torch.testing.assert_close(first[k], again[k])
    node.train(state, 2, 0, fmt.expected)
    # round 2's reply carried round 1's validation, so from round 3 on the coordinator names it best
    node.train(state, 3, 1, fmt.expected)
    node.train(state, 4, 1, fmt.expected)  # best round 1 is kept, round 2 pruned
    kept = sorted(p.name for p in tmp_path.glob("round-*.pt"))
    assert kept == ["round-0001.pt", "round-0003.pt", "round-0004.pt"]
    torch.testing.assert_close(node.state_at(1)[0], users_after_1)


def test_stage_formats_of_both_sides_agree() -> None:
    cfg = load_config(None)
    fmt = stage_format("train", 30, cfg)
    assert "val/recall@20" in fmt.names and "delta/item_emb.weight" in fmt.names
    assert list(fmt.names) == sorted(fmt.names)
    assert set(stage_format("finish", 30, cfg).names) >= {"test/recall@20", "test/users"}
    with pytest.raises(ValueError, match="stage"):
        stage_format("nope", 30, cfg)


def test_round_is_refused_below_the_minimum_and_never_sent_in_the_clear(caplog) -> None:
    from flwr.server import SimpleClientManager

    from fedrec.training.flower_server import SumsStrategy

    class Proxy:
        def __init__(self, cid: str) -> None:
            self.cid, self.node_id = cid, int(cid)

    cm = SimpleClientManager()
    for i in (1, 2):
        cm.register(Proxy(str(i)))
    strategy = SumsStrategy(1.0, 3, secagg=True, wait_s=0)
    with caplog.at_level("ERROR"):
        assert strategy.configure_fit(1, None, cm) == []
    assert "at least 3 needed" in caplog.text and "never falls back" in caplog.text
    cm.register(Proxy("3"))
    cm.register(Proxy("4"))
    assert len(strategy.configure_fit(1, None, cm)) == 4
    capped = SumsStrategy(1.0, 3, secagg=True, wait_s=0, max_merchants=3)  # SecAgg+ overflow bound
    assert len(capped.configure_fit(1, None, cm)) == 3


def test_dp_replies_keep_their_precision_through_secagg_quantisation(synthetic_bundles, tmp_path) -> None:
    """Under DP the weight is 1: the training sums get scale 1 (not max_weight), metric sums keep
    max_weight, and the quantised total of real DP updates decodes within 1e-4 of the exact one
    (with scale max_weight the DP delta would sit below one quantisation step)."""
    base, _, bundles = synthetic_bundles
    cfg = load_config(
        default_config_path("synthetic"),
        {"federation.rounds": 2, "privacy.epsilon": 8.0, "privacy.sample_rate": 0.5},
    )
    fmt = stage_format("train", load_bundle(next(bundles.iterdir())).items.height, cfg)
    scales = dict(zip(fmt.names, fmt.scales, strict=True))
    assert scales["delta/item_emb.weight"] == 1.0 and scales["val/users"] == cfg.network.max_weight
    state = {
        k: v.detach().clone()
        for k, v in new_item_tower(fmt.expected["delta/item_emb.weight"][0], cfg.model, 0).state_dict().items()
    }
    clip, q = cfg.network.clipping_range, cfg.network.quantization_range
    msgs = []
    for i, path in enumerate(sorted(bundles.iterdir())[:3]):
        node = MerchantNode(load_bundle(path), tmp_path / f"dp{i}", cfg)
        msgs.append(to_wire(node.train(state, 1, 0, fmt.expected), fmt, clip))
    np.random.seed(0)
    summed = [sum(parts) for parts in zip(*[quantize(m, clip, q) for m in msgs], strict=True)]
    decoded = [a - (len(msgs) - 1) * clip for a in dequantize(summed, clip, q)]
    exact = aggregate_sums(from_wire(sum_arrays(msgs), fmt), "fedavg", True)
    secure = aggregate_sums(from_wire(decoded, fmt), "fedavg", True)
    assert exact["item_emb.weight"].abs().max() > 1e-3  # a real, noised update
    for k in exact:
        assert (secure[k] - exact[k]).abs().max().item() < 1e-4, k


def test_an_exchange_is_retried_until_answered_and_stops_after_max_failed_rounds() -> None:
    """Training and refit rounds share one retry rule: a round with too few answers is sent again,
    and `network.max_failed_rounds` unanswered attempts in a row stop the run with a clear error."""
    from types import SimpleNamespace

    from fedrec.training.flower_server import _answered

    def coordinator(answers: list):
        calls = []

        def train_exchange(stage, rnd, state, **extra):  # the round's totals: one, or one per group
            calls.append((stage, rnd, extra))
            return answers.pop(0)

        def round_delta(totals, state):
            return {"delta/x": sum(t["n"] for t in totals)}

        cfg = load_config(None, {"network.max_failed_rounds": 3})
        return SimpleNamespace(cfg=cfg, train_exchange=train_exchange, round_delta=round_delta), calls

    n = {"n": torch.tensor(1.0)}
    coord, calls = coordinator([None, None, [n, {"n": torch.tensor(2.0)}]])
    total, delta, _ = _answered(coord, "refit", 7, {}, "refit round 2", refit_round=2)
    assert calls == [("refit", 7, {"refit_round": 2})] * 3
    assert float(total["n"]) == 3.0 and float(delta["delta/x"]) == 3.0  # the groups' sum, and their delta
    coord, calls = coordinator([None, None, None, [n]])
    with pytest.raises(FedrecError, match="round 4 failed 3 times in a row"):
        _answered(coord, "train", 4, {}, "round 4")
    assert len(calls) == 3


def test_a_grouped_exchange_sends_each_group_its_own_exchange_and_needs_three_answers() -> None:
    """`federation.robust_groups` on the coordinator: the round's merchants ordered by node id and
    split as `assign_groups` says, one exchange (one SecAgg+ run) per group, the groups' totals
    back; a group that fails is left out, and fewer than three group sums refuse the round."""
    from types import SimpleNamespace

    from fedrec.federated.groups import assign_groups
    from fedrec.training.flower_server import Coordinator

    nodes = [50, 10, 40, 20, 30, 60, 90, 80, 70]
    cfg = load_config(None, {"federation.robust": "median", "federation.robust_groups": 3, "network.min_merchants": 9})
    want = [[sorted(nodes)[i] for i in idx] for idx in assign_groups(9, 3, cfg.federation.seed, 4)]

    def coordinator(failing: set[int], sampled: list[int] = nodes):
        strategy = SimpleNamespace(
            group=None, contributors=0, sample=lambda _: [SimpleNamespace(node_id=n) for n in sampled]
        )
        coord = Coordinator(None, SimpleNamespace(client_manager=None), strategy, None, cfg, 5, "key")
        sent = []

        def exchange(stage, rnd, state, **extra):
            sent.append([c.node_id for c in strategy.group])
            strategy.contributors = len(strategy.group)
            return None if len(sent) in failing else {"n": torch.tensor(float(len(sent)))}

        coord.exchange = exchange
        return coord, strategy, sent

    coord, strategy, sent = coordinator(set())
    totals = coord.train_exchange("train", 4, {})
    assert sent == want and [float(t["n"]) for t in totals] == [1.0, 2.0, 3.0]
    assert strategy.group is None and strategy.contributors == 9
    coord, strategy, sent = coordinator({2})
    assert coord.train_exchange("train", 4, {}) is None and len(sent) == 3 and strategy.group is None
    coord, strategy, sent = coordinator(set(), nodes[:8])  # too few sampled to fill 3 groups of 3: refused
    assert coord.train_exchange("train", 4, {}) is None and sent == []


class _SlowLink:
    """A Grid whose replies arrive over several pulls: one per node, on the pull given."""

    def __init__(self, arrives_at: dict[str, int]) -> None:
        self.arrives_at, self.pulls, self.pushed = arrives_at, 0, []

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        self.pushed = list(messages)
        return list(self.arrives_at)

    def pull_messages(self, ids):  # noqa: ANN001, ANN201
        self.pulls += 1
        ready = [i for i in ids if self.arrives_at[i] == self.pulls]
        return [type("Reply", (), {"metadata": type("Meta", (), {"reply_to_message_id": i})()})() for i in ready]


def test_reply_pull_collects_every_reply_and_stops_at_the_last_or_at_the_timeout() -> None:
    from fedrec.training.flower_server import pull_replies

    link = _SlowLink({"a": 1, "b": 3, "c": 3})
    replies = pull_replies(link, ["m1", "m2", "m3"], timeout=None, poll_s=0.0)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]
    assert link.pulls == 3  # no pull after the last reply
    assert link.pushed == ["m1", "m2", "m3"]
    late = _SlowLink({"a": 1, "b": 10**9})
    got = pull_replies(late, ["m1", "m2"], timeout=0.05, poll_s=0.01)
    assert [r.metadata.reply_to_message_id for r in got] == ["a"]  # what came in time, no more
    assert late.pulls >= 2


# the exact item step is aggregated by solving (`auto`), where the synthetic config sets fedavg
DP_ALS = {"privacy.mechanism": "als", "local.loss": "ials", "local.ials_item_step": "exact", "local.temperature": 1.0,
          "federation.aggregation": "auto",
          "model.use_content": False, "model.dim": 16, "privacy.clip": 0.03, "local.user_solve_reg": 10.0,
          "privacy.count_share": 0.3, "privacy.epsilon": 8.0, "privacy.noise_split": 6, "federation.rounds": 2,
          "federation.refit": False}  # fmt: skip


def test_dp_als_over_the_wire_equals_the_in_process_runtime(synthetic_bundles, tmp_path) -> None:
    """DP-ALS in the networked runtime: its sums get public scales from the config (max_weight x
    clip, x clip^2), the nodes' noised sums through the wire, and through SecAgg+'s quantisation,
    solve to the in-process table; each node's customers, re-solved against the received table,
    and its count bias are the in-process ones. Tolerances: float32 on the wire (1e-4); SecAgg+'s
    rounding in the sums has under a tenth of the noise's standard deviation (1% of its variance;
    not accounted for)."""
    _, ds, out = synthetic_bundles
    cfg = load_config(default_config_path("synthetic"), {**DP_ALS, "threads": 1})
    assert aggregation_rule(cfg, ds.n_items) == ALS_DP
    mech = plan_mechanism(cfg.privacy, cfg.federation.rounds, cfg.local.epochs)
    features = build_item_features(ds.items, cfg.model.hash_buckets)
    inproc = run_federated(ds, features, cfg.model, cfg.local, cfg.federation, dp=mech)

    fmt = stage_format("train", ds.n_items, cfg)
    scales = dict(zip(fmt.names, fmt.scales, strict=True))
    assert scales[noisy_als.RHS] == pytest.approx(cfg.network.max_weight * 0.03)
    assert scales[noisy_als.GRAM] == pytest.approx(cfg.network.max_weight * 0.03**2)
    assert noisy_als.COUNTS not in scales  # the counts never leave the merchant
    nodes = [MerchantNode(load_bundle(out / m.name), tmp_path / m.name, cfg) for m in ds.merchants]
    clip, q = cfg.network.clipping_range, cfg.network.quantization_range
    state = initial_item_state(ds.n_items, cfg.model, cfg.federation.seed)
    np.random.seed(0)
    for rnd in (1, 2):
        received = state_from_arrays(state_to_arrays(state), ds.n_items, cfg.model)
        msgs = [to_wire(n.train(received, rnd, 0, fmt.expected), fmt, clip) for n in nodes]
        summed = [sum(parts) for parts in zip(*[quantize(m, clip, q) for m in msgs], strict=True)]
        decoded = [a - (len(msgs) - 1) * clip for a in dequantize(summed, clip, q)]
        plain, secure = from_wire(sum_arrays(msgs), fmt), from_wire(decoded, fmt)
        # SecAgg+'s rounding, against the noise the sum carries (the whole noise multiplier, split 6 ways)
        s_rhs, s_gram, _ = noisy_als.block_scales(mech.clip, mech.max_purchases, mech.count_share)
        for name, unit in ((noisy_als.RHS, s_rhs), (noisy_als.GRAM, s_gram)):
            rounding = (secure[name] - plain[name]).double()
            assert 0 < rounding.std().item() < 0.1 * mech.noise_multiplier * unit, name
        args = (ALS_DP, state, cfg.federation.normalize_steps, cfg.local.ials_alpha, cfg.local.user_solve_reg)
        delta = delta_from_sums(plain, *args)
        state = {noisy_als.TABLE: state[noisy_als.TABLE] + delta[noisy_als.TABLE]}  # fedavg at lr 1: the solution
    torch.testing.assert_close(state[noisy_als.TABLE], inproc.item_state[noisy_als.TABLE], rtol=1e-4, atol=1e-4)
    for n in nodes:
        users, bias = n.state_at(2)
        torch.testing.assert_close(n._users_for(state, users), inproc.user_embeddings[n.name], rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(bias, inproc.item_biases[n.name])


@dataclasses.dataclass
class _BothRuntimes:
    cfg: object
    features: object
    inproc: object  # the in-process run, refit on
    best: int  # its early-stopped best round
    nodes: list
    twins: list  # the nodes' refit twins
    early: dict  # the nodes' tower at the best round (over the wire)
    released: dict  # their refit's tower after as many rounds


def _both_runtimes(ds, out, tmp_path, sets: dict) -> _BothRuntimes:  # noqa: ANN001
    """Two rounds of `sets` on the synthetic shop in-process, then the same early-stopped run and
    refit through the nodes' path over the wire: what the post-training choices start from."""
    cfg = load_config(default_config_path("synthetic"), sets)
    features = build_item_features(ds.items, cfg.model.hash_buckets)
    inproc = run_federated(ds, features, cfg.model, cfg.local, cfg.federation)
    best = inproc.early_stopped.best_round
    nodes = [MerchantNode(load_bundle(out / m.name), tmp_path / m.name, cfg) for m in ds.merchants]
    early = _train_over_wire(nodes, 2, cfg, ds.n_items)[best]
    twins = [n.refit_node() for n in nodes]
    released = _train_over_wire(twins, best, cfg, ds.n_items)[best]
    return _BothRuntimes(cfg, features, inproc, best, nodes, twins, early, released)


def test_the_popularity_prior_over_the_wire_is_the_in_process_choice(synthetic_bundles, tmp_path) -> None:
    """A large catalogue (the switch lowered to 1,000 products) in the networked runtime's path: the
    summed buyer counts are the pooled ones, the summed candidate sums choose the in-process weight
    with its validation scores, and the released model with the prior's offsets (of train +
    validation, after the refit) gives the in-process test recall."""
    _, ds, out = synthetic_bundles
    sets = {
        "federation.rounds": 2,
        "federation.patience": 0,
        "federation.refit": True,
        "local.full_softmax_max_items": 1000,
        "local.sampled_popularity_weights": [0.1, 1.0],  # no weight 0: the released biases carry offsets
        "threads": 1,
    }
    run = _both_runtimes(ds, out, tmp_path, sets)
    cfg, features, inproc, best = run.cfg, run.features, run.inproc, run.best
    nodes, twins, early, released = run.nodes, run.twins, run.early, run.released
    assert popularity_prior.applies(cfg.local, ds.n_items, private=False)
    counts = _exchange(nodes, "buyers", cfg, ds.n_items, lambda n: n.buyers())
    buyers = {k: np.rint(v.double().numpy()) for k, v in counts.items()}
    np.testing.assert_array_equal(buyers[popularity_prior.BUYERS], popularity_prior.pooled_buyers(ds.merchants, False))
    np.testing.assert_array_equal(
        buyers[popularity_prior.BUYERS_FULL], popularity_prior.pooled_buyers(ds.merchants, True)
    )  # fmt: skip
    train_buyers = buyers[popularity_prior.BUYERS]
    sums = _exchange(nodes, "prior", cfg, ds.n_items, lambda n: n.prior(early, best, train_buyers))
    weight, scores = popularity_prior.choose_from_sums(sums, cfg.local.sampled_popularity_weights)
    assert weight == inproc.popularity.weight > 0
    assert scores == pytest.approx(inproc.popularity.scores, abs=1e-6)
    offsets = popularity_prior.prior_offsets(buyers[popularity_prior.BUYERS_FULL], weight)
    test = _exchange(twins, "finish", cfg, ds.n_items, lambda n: n.finish(released, best, "v1", tmp_path, offsets))
    vecs = item_embeddings(inproc.item_state, features, cfg.model)
    want = evaluate_test_all(ds.merchants, inproc.user_embeddings, vecs, inproc.item_biases)["overall"]["recall@20"]
    assert float(test["test/recall@20"] / test["test/users"]) == pytest.approx(want, abs=1e-4)


def test_the_content_match_over_the_wire_is_the_in_process_choice(synthetic_bundles, tmp_path) -> None:
    """The content match in the networked runtime's path: the coordinator's basis is the in-process
    one, the merchants' summed candidate sums choose the in-process weight with its validation
    scores, and the released model with the match (profiles of train + validation, after the refit)
    gives the in-process test recall; each merchant's export holds [u, w p]."""
    _, ds, out = synthetic_bundles
    sets = {
        "federation.rounds": 2,
        "federation.patience": 0,
        "federation.refit": True,
        "model.content_match_weights": [1.0, 2.0],  # no weight 0: the released model carries the match
        "threads": 1,
    }
    run = _both_runtimes(ds, out, tmp_path, sets)
    cfg, features, inproc, best = run.cfg, run.features, run.inproc, run.best
    nodes, twins, early, released = run.nodes, run.twins, run.early, run.released
    basis = content_basis(features, cfg.model.content_match_dim)
    torch.testing.assert_close(basis, inproc.item_state[BASIS])
    # on the wire only the shared tokens' rows travel; each node places them from its own catalogue
    rows = basis_rows(basis, features)
    assert rows.shape[1] == basis.shape[1] and 0 < rows.shape[0] < basis.shape[0] // 10
    for n in nodes:
        assert torch.equal(basis_from_rows(rows, n.features), basis)
    sums = _exchange(nodes, "content", cfg, ds.n_items, lambda n: n.content(early, best, basis))
    weight, scores = content_choice.choose_from_sums(sums, cfg.model.content_match_weights)
    assert weight == inproc.content_match.weight > 0
    assert scores == pytest.approx(inproc.content_match.scores, abs=1e-6)
    # each node chooses its served popularity weight with the early-stopped tower, as in-process
    served = {n.name: n.choose_served_weight(early, best, (basis, weight)) for n in nodes}
    assert served == {name: w.entry() for name, w in inproc.served_weights.items()}
    answer = lambda n: n.finish(released, best, "v1", tmp_path, None, (basis, weight), served[n.name])  # noqa: E731
    test = _exchange(twins, "finish", cfg, ds.n_items, answer)
    vecs = item_embeddings(inproc.item_state, features, cfg.model)
    want = evaluate_test_all(ds.merchants, inproc.user_embeddings, vecs, inproc.item_biases)["overall"]["recall@20"]
    assert float(test["test/recall@20"] / test["test/users"]) == pytest.approx(want, abs=1e-4)
    m = ds.merchants[0]
    exported = np.load(tmp_path / "merchants" / m.name / "v1" / "user_embeddings.npy")
    np.testing.assert_allclose(exported, inproc.user_embeddings[m.name].numpy(), rtol=1e-3, atol=1e-4)
    written = json.loads((tmp_path / "merchants" / m.name / "v1" / SERVED_WEIGHT_FILE).read_text())
    assert written["popularity_weight"] == inproc.served_weights[m.name].weight


def test_the_client_refuses_arrays_its_stage_does_not_expect() -> None:
    cfg = load_config(default_config_path("synthetic"))
    shared = 30  # the node's catalogue's shared tokens: the basis's rows on the wire
    basis = np.zeros((shared, 8))
    assert extra_shapes("content", {}, 50, cfg, [basis], shared) == [basis.shape]
    assert extra_shapes("finish", {"content-weight": 1.0}, 50, cfg, [basis], shared) == [basis.shape]
    assert extra_shapes("finish", {"prior-weight": 1.0}, 50, cfg, [np.zeros(50)], shared) == [(50,)]
    assert extra_shapes("finish", {}, 50, cfg, [], shared) == []
    tower = list(item_tower_shapes(50, cfg.model).values())  # "served": the early-stopped tower after the rest
    assert extra_shapes("finish", {"served": 1, "refit-rounds": 2}, 50, cfg, [], shared) == tower
    assert extra_shapes("finish", {"served": 1}, 50, cfg, [], shared) == []  # no refit: the released tower
    refit = {"content-weight": 1.0, "served": 1, "refit-rounds": 2}
    assert extra_shapes("finish", refit, 50, cfg, [basis], shared) == [
        basis.shape,
        *tower,
    ]
    whole = np.zeros((cfg.model.hash_buckets + 1, 8))  # the whole basis is not what travels
    assert extra_shapes("content", {}, 50, cfg, [whole], shared) != [whole.shape]
    wide = np.zeros((shared, cfg.model.content_match_dim + 1))
    assert extra_shapes("content", {}, 50, cfg, [wide], shared) != [wide.shape]  # wider than the configured basis
    assert extra_shapes("content", {}, 50, cfg, [np.zeros(50)], shared) != [(50,)]  # counts are not a basis
    assert extra_shapes("train", {}, 50, cfg, [np.zeros(50)], shared) == []
