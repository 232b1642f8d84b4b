"""A robust rule over secure group sums, on the networked runtime: nine merchant nodes on loopback
(TLS, node authentication, SecAgg+), split each round into three groups of three, one SecAgg+ run
per group. The coordinator's tower after one round is the in-process one computed from the same
nine merchants' messages grouped the same way (groups follow node ids), within SecAgg+'s
quantisation; and it is not the plain sum's.

Nine node processes and three SecAgg+ runs a round take minutes on two cores: `-m slow`. In CI: the
groups, the rule over group sums, the refusals and the promotion attack in-process
(tests/test_groups.py), through the same `robust_delta` the coordinator calls.
"""

from __future__ import annotations

import json

import polars as pl
import pytest
import torch

from fedrec.config import load_config
from fedrec.data import PurchaseLog
from fedrec.datasets.protocol import temporal_split
from fedrec.datasets.synthetic import generate
from fedrec.features import build_item_features
from fedrec.federated.aggregation import delta_from_sums, sum_all
from fedrec.federated.credentials import make_node_key, make_tls
from fedrec.federated.groups import assign_groups
from fedrec.federated.merchant_node import write_bundles
from fedrec.federated.robust import robust_delta
from fedrec.federated.server_opt import ServerOptimizer
from fedrec.federated.simulation import run_federated
from fedrec.model import initial_item_state
from fedrec.training.cli import default_config_path
from fedrec.training.federation import flower_env, write_flwr_config
from fedrec.training.federation_demo import Processes, free_port, register_node, start_coordinator, start_node
from tests.test_federation_network import _node_id, _run
from tests.test_groups import NINE

pytestmark = [pytest.mark.network, pytest.mark.slow]
GROUPED = ("federation.robust=median", "federation.robust_groups=3", "network.min_merchants=9")


@pytest.fixture(scope="module")
def nine_nodes(tmp_path_factory):
    work = tmp_path_factory.mktemp("nine")
    purchases, products = generate(NINE)
    ds = temporal_split(PurchaseLog("nine", purchases, products.with_columns(tags=pl.lit(None, dtype=pl.String))))
    bundles = write_bundles(ds, work / "bundles")
    creds = work / "creds"
    make_tls(creds)
    for b in bundles:
        make_node_key(creds / "keys", b.name)
    procs = Processes()
    try:
        port = free_port()
        superlink = f"127.0.0.1:{port}"
        start_coordinator(procs, creds, work / "coordinator" / "superlink.db", port, work / "logs" / "coordinator.log")
        home = work / "flwr-home"
        write_flwr_config(home, superlink, creds / "ca.crt")
        env = {**flower_env(), "FLWR_HOME": str(home)}
        for b in bundles:
            register_node(creds / "keys" / f"{b.name}.pub", env)
        for b in bundles:
            node_dir = work / "nodes" / b.name
            start_node(procs, b.name, b, creds, superlink, node_dir / "state", node_dir / "artifacts", work / "logs")
        yield {"work": work, "superlink": superlink, "creds": creds, "bundles": bundles, "procs": procs,
               "env": env, "dataset": ds}  # fmt: skip
    finally:
        procs.stop_all()


def test_a_robust_rule_over_secure_group_sums_runs_like_in_process(nine_nodes) -> None:
    out = _run(nine_nodes, "groups", *GROUPED, "federation.aggregation=fedavg", timeout=480)
    networked = torch.load(out["workdir"] / "checkpoint.pt", weights_only=False)["state"]
    card = json.loads((out["workdir"] / "exports" / out["summary"]["version"] / "model_card.json").read_text())
    assert card["federation"]["robust_groups"] == 3
    assert card["privacy"]["coordinator_sees"].startswith("only sums over groups")
    ds = nine_nodes["dataset"]
    sets = {"federation.rounds": 1, "federation.refit": False, "threads": 1, "federation.aggregation": "fedavg"}
    cfg = load_config(default_config_path("synthetic"), sets)
    features = build_item_features(ds.items, cfg.model.hash_buckets)
    messages = {}
    run_federated(ds, features, cfg.model, cfg.local, cfg.federation, on_message=lambda n, m: messages.update({n: m}))
    # the coordinator orders the round's merchants by node id, then draws the groups of round 1
    by_node = sorted(messages, key=lambda name: int(_node_id(nine_nodes, name)))
    groups = [sum_all(messages[by_node[i]].tensors for i in idx) for idx in assign_groups(9, 3, cfg.federation.seed, 1)]
    fed = cfg.federation
    start = initial_item_state(ds.n_items, cfg.model, fed.seed)

    def tower(delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return ServerOptimizer(fed.server).step(start, delta)

    grouped = tower(robust_delta(groups, "median", fed.normalize_steps))
    plain = tower(delta_from_sums(sum_all(m.tensors for m in messages.values()), "fedavg", start,
                                  fed.normalize_steps, cfg.local.ials_alpha, cfg.local.user_solve_reg))  # fmt: skip
    gaps = {k: float((grouped[k] - v).abs().max()) for k, v in networked.items()}  # the in-process state
    table = "item_emb.weight"  # adds the content match's blocks
    print(f"largest gap to in-process {max(gaps.values()):.2e}; the plain sum's tower is "
          f"{float((plain[table] - grouped[table]).abs().max()):.2e} away")  # fmt: skip
    assert max(gaps.values()) < 1e-3, gaps
    assert float((plain[table] - grouped[table]).abs().max()) > 3e-3  # a coordinator that summed all fails
