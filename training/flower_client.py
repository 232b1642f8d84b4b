"""The merchant's ClientApp for Flower: a thin shell around `MerchantNode`.

The SuperNode passes the node's own settings (`--node-config`): `bundle` (the merchant's data
directory), `state-dir` (its private state) and `artifacts-dir` (where it writes its own export).
The coordinator's instruction carries the run config, the round and the stage; the reply is
`wire.to_wire` of the stage's sums and nothing else (its num_examples is the constant 1, so
SecAgg+ adds the arrays without weighting them and nothing about n_k travels outside the sums).
With SecAgg+ on, `secaggplus_mod` masks that reply; the coordinator sees only the sum.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context, Message
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

# Flower starts a new ClientApp process for every message (four per SecAgg+ round), so this
# module imports only Flower; torch and the model are imported in `fit`, the one stage that
# needs them (measured: 0.5 s instead of 3.3 s of imports for the other three).
log = logging.getLogger("flwr").getChild("fedrec")


class MerchantClient(NumPyClient):
    def __init__(self, node_config: dict) -> None:
        self.node_config = node_config

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        t0 = time.perf_counter()

        from fedrec.config import config_from_dict
        from fedrec.content_match import basis_from_rows, shared_tokens
        from fedrec.federated.merchant_node import MerchantNode, load_bundle
        from fedrec.federated.popularity_prior import prior_offsets
        from fedrec.federated.protocol import stage_format, state_and_extra, state_from_arrays
        from fedrec.federated.simulation import trains_on_validation
        from fedrec.federated.wire import to_wire
        from fedrec.model import item_tower_shapes
        from fedrec.threads import use_threads

        t_imports = time.perf_counter() - t0
        cfg = config_from_dict(json.loads(str(config["fedrec-config"])))
        use_threads(cfg.threads)
        stage, rnd = str(config["stage"]), int(config["round"])
        state_dir = Path(str(self.node_config["state-dir"])) / f"run-{config['run-key']}"
        node = MerchantNode(load_bundle(Path(str(self.node_config["bundle"]))), state_dir, cfg)
        if trains_on_validation(cfg.federation, cfg.privacy.enabled):  # DP: one run, on train + validation
            node = node.refit_node()
        state, extra = state_and_extra(parameters, node.features.n_items, cfg.model)
        shared = len(shared_tokens(node.features)) if carries_basis(stage, config) else 0  # its rows on the wire
        if [a.shape for a in extra] != extra_shapes(stage, config, node.features.n_items, cfg, extra, shared):
            raise ValueError(f"stage {stage!r}: unexpected arrays after the item tower {[a.shape for a in extra]}")
        fmt = stage_format(stage, node.features.n_items, cfg)
        if stage == "train":
            sums = node.train(state, rnd, int(config["best-round"]), fmt.expected)
        elif stage == "validate":
            sums = node.validate(state, rnd)
        elif stage == "refit":  # its own rounds 1, 2, ...: the same seeds as the in-process refit
            sums = node.refit_node().train(state, int(config["refit-round"]), 0, fmt.expected)
        elif stage == "buyers":
            sums = node.buyers()
        elif stage == "prior":  # the early-stopped model, with the pooled train counts after it
            sums = node.prior(state, int(config["best-round"]), extra[0])
        elif stage == "content":  # the early-stopped model, with the content match's basis after it
            sums = node.content(state, int(config["best-round"]), basis_from_rows(extra[0], node.features))
        elif stage == "finish":
            out = Path(str(self.node_config.get("artifacts-dir", node.state_dir / "artifacts")))
            refit_rounds = int(config.get("refit-rounds", 0))
            offsets = prior_offsets(extra[0], float(config["prior-weight"])) if "prior-weight" in config else None
            content = None
            if "content-weight" in config:
                content = (basis_from_rows(extra[0], node.features), float(config["content-weight"]))
            served = None
            if "served" in config:  # with the early-stopped tower (after the rest, or the released one): its weight
                early = state
                if refit_rounds:
                    k = len(item_tower_shapes(node.features.n_items, cfg.model))
                    early = state_from_arrays(extra[-k:], node.features.n_items, cfg.model)
                served = node.choose_served_weight(early, int(config["best-round"]), content)
            args = (str(config["version"]), out, offsets, content, served)
            if refit_rounds:  # the released model is the refit's last round
                sums = node.refit_node().finish(state, refit_rounds, *args)
            else:
                sums = node.finish(state, int(config["best-round"]), *args)
        else:
            raise ValueError(f"unknown stage {stage!r}")
        arrays = to_wire(sums, fmt, cfg.network.clipping_range)
        fault = os.environ.get("FEDREC_TEST_FAULT", "")  # tests only: a node that sends a bad update
        if fault and stage == "train":
            arrays = _inject(arrays, fault)
        log.info(
            "merchant %s: %s round %d answered (%d arrays; imports %.2fs, work %.2fs)",
            node.name, stage, rnd, len(arrays), t_imports, time.perf_counter() - t0 - t_imports,
        )  # fmt: skip
        _note_peak_rss(Path(str(self.node_config["state-dir"])) / "rss.json")
        return arrays, 1, {}


def extra_shapes(stage: str, config: dict, n_items: int, cfg, extra: list, shared: int) -> list[tuple[int, ...]]:  # noqa: ANN001
    """The arrays a stage may carry after the item tower: the prior's pooled counts (one per
    product), or the content match's basis as `basis_rows` sends it (a row per token that `shared`
    counts, at most `model.content_match_dim` columns; its rank depends on the catalogue); then, at
    `finish` with "served" after a refit, the early-stopped item tower (`MerchantNode.choose_served_weight`;
    without a refit the released tower is the early-stopped one, and is not sent twice)."""
    from fedrec.model import item_tower_shapes

    basis_cols = extra[0].shape[1] if extra and extra[0].ndim == 2 else -1
    basis = (shared, basis_cols) if 1 <= basis_cols <= cfg.model.content_match_dim else None
    sends_early = stage == "finish" and "served" in config and int(config.get("refit-rounds", 0)) > 0
    early = list(item_tower_shapes(n_items, cfg.model).values()) if sends_early else []
    if stage == "prior" or (stage == "finish" and "prior-weight" in config):
        return [(n_items,), *early]
    if carries_basis(stage, config):
        return [basis, *early]
    return early


def carries_basis(stage: str, config: dict) -> bool:
    """Whether a stage's message carries the content match's basis (as `basis_rows`)."""
    return stage == "content" or (stage == "finish" and "content-weight" in config)


def _note_peak_rss(path: Path) -> None:
    """The largest peak RSS of this node's ClientApp processes so far (for make bench-federation)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with contextlib.suppress(OSError, ValueError, KeyError):
        peak = max(peak, json.loads(path.read_text())["peak_rss_mb"])
    path.write_text(json.dumps({"peak_rss_mb": peak}))


def _inject(arrays: list[np.ndarray], fault: str) -> list[np.ndarray]:
    bad = [a.copy() for a in arrays]
    i = int(np.argmax([a.size for a in bad]))
    if fault == "nan":
        bad[i].flat[0] = np.nan
    elif fault == "shape":
        bad[i] = bad[i][:-1]
    elif fault == "dtype":
        bad[i] = bad[i].astype(np.float64)
    return bad


def secagg_when_asked(msg: Message, ctxt: Context, call_next):  # noqa: ANN201 (Flower's mod signature)
    """SecAgg+ for the coordinator's secure rounds; plaintext rounds go straight to the client."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, ctxt, call_next)
    return call_next(msg, ctxt)


def _client_fn(context: Context):  # noqa: ANN202
    return MerchantClient(dict(context.node_config)).to_client()


app = ClientApp(client_fn=_client_fn, mods=[secagg_when_asked])
