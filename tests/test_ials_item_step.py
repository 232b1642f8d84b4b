"""ALS's exact item step, federated: the sum of the merchants' terms solves exactly what centralized
ALS solves on the pooled purchases, round after round, and settings it cannot honour are refused."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from typer.testing import CliRunner

from fedrec.config import check_networked, load_config
from fedrec.errors import ConfigError
from fedrec.features import build_item_features
from fedrec.federated.aggregation import ALS, merchant_sums, resolve_rule, sum_names
from fedrec.federated.candidates import candidates_of, unsupported
from fedrec.federated.ials_item_step import GRAM, LHS, RHS, item_step_terms, solve_item_table
from fedrec.federated.local import LocalConfig
from fedrec.federated.simulation import FederationConfig, run_federated
from fedrec.ials_users import solve_ials_users
from fedrec.model import ModelConfig, initial_item_state, item_tower_shapes
from fedrec.training.cli import app, default_config_path

ALPHA, REG = 4.0, 1.0
MODEL = ModelConfig(dim=8, use_content=False, hash_buckets=64)
LOCAL = LocalConfig(loss="ials", temperature=1.0, ials_alpha=ALPHA, user_solve_reg=REG, ials_item_step="exact")
EXACT = {"data.dataset": "synthetic", "local.loss": "ials", "local.temperature": 1.0, "local.ials_item_step": "exact",
         "model.use_content": False}  # fmt: skip
EXACT_CANDIDATE = {"local.loss": "ials", "local.temperature": 1.0, "local.ials_item_step": "exact"}


def _merchants(seed: int = 0) -> list[tuple[np.ndarray, sp.csr_matrix]]:
    """Three merchants' customer vectors and purchases over one 40-product catalogue; some customers
    bought nothing, some products nobody bought."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (12, 7, 20):
        dense = (rng.random((n, 40)) < 0.15) * (np.arange(40) < 35)
        dense[0] = 0
        out.append((rng.normal(size=(n, 8)), sp.csr_matrix(dense.astype(np.float64))))
    return out


def test_the_summed_terms_solve_centralized_als_item_step():
    merchants = _merchants()
    total = {k: sum(item_step_terms(u, p, ALPHA)[k] for u, p in merchants) for k in (GRAM, LHS, RHS)}
    federated = solve_item_table(total, REG).double().numpy()
    # ALS's item step on the pooled purchases: the user solve with the roles of users and items swapped
    users = np.vstack([u[np.diff(p.indptr) > 0] for u, p in merchants])
    pooled = sp.vstack([p[np.diff(p.indptr) > 0] for _, p in merchants]).tocsr()
    central = solve_ials_users(users, pooled.T.tocsr(), ALPHA, REG)
    np.testing.assert_allclose(federated, central, rtol=1e-4, atol=1e-5)
    assert np.abs(central[:35]).max() > 0.05  # bought products moved: the comparison is not of zeros
    np.testing.assert_array_equal(federated[35:], 0.0)  # nobody bought them: ALS's zero vector


def test_a_merchants_terms_cover_only_its_own_customers():
    (u, p), *_ = _merchants()
    terms = item_step_terms(u, p, ALPHA)
    bought = np.diff(p.indptr) > 0
    np.testing.assert_allclose(terms[GRAM].numpy(), u[bought].T @ u[bought], rtol=1e-5, atol=1e-5)
    sold = np.asarray(p.sum(axis=0)).ravel() > 0
    assert torch.all(terms[RHS][torch.from_numpy(~sold)] == 0) and torch.all(terms[LHS][torch.from_numpy(~sold)] == 0)
    assert torch.all(terms[RHS][torch.from_numpy(sold)].abs().sum(1) > 0)


def test_the_federation_runs_centralized_als_round_for_round(tiny_dataset):
    """Round r: every merchant solves its customers against the table it received (ALS's user
    step), the coordinator solves the table from the summed terms (the item step). Pooled, that
    is ALS from the same start, so the released table is ALS's iterate at the chosen round."""
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    fed = FederationConfig(rounds=4, patience=0, refit=False)
    res = run_federated(tiny_dataset, features, MODEL, LOCAL, fed)
    assert [h.round for h in res.history] == [1, 2, 3, 4] and res.best_round >= 1

    pooled = sp.vstack([m.train for m in tiny_dataset.merchants]).tocsr()
    pooled = pooled[np.diff(pooled.indptr) > 0]
    items = initial_item_state(tiny_dataset.n_items, MODEL, fed.seed)["item_emb.weight"].double().numpy()
    for _ in range(res.best_round):
        users = solve_ials_users(items, pooled, ALPHA, REG)
        items = solve_ials_users(users, pooled.T.tocsr(), ALPHA, REG)
    got = res.item_state["item_emb.weight"].double().numpy()
    np.testing.assert_allclose(got, items, rtol=1e-3, atol=1e-4)
    assert res.history[-1].loss < res.history[0].loss  # ALS lowers its objective round after round
    # ALS ends on a user step: every merchant's customers belong to the table released with them
    for m in tiny_dataset.merchants:
        bought = np.diff(m.train.indptr) > 0
        want = solve_ials_users(got, m.train[bought], ALPHA, REG)
        users = res.user_embeddings[m.name][:, : MODEL.dim]  # without the content match's block
        np.testing.assert_allclose(users.double().numpy()[bought], want, rtol=1e-3, atol=1e-5)


def test_the_message_holds_the_terms_and_no_delta():
    shapes = item_tower_shapes(40, MODEL)
    assert resolve_rule("auto", shapes, False, "none", "ials", "exact") == ALS
    assert resolve_rule("auto", shapes, False, "none", "ials", "sgd") == "fedavg"
    names = sum_names(shapes, ALS)
    assert names[LHS] == (40, 8, 8) and names[RHS] == (40, 8) and names[GRAM] == (8, 8)
    assert not any(k.startswith("delta/") for k in names)
    u, p = _merchants()[0]
    sums = merchant_sums({}, int(p.nnz), 1, torch.zeros(40, dtype=torch.bool), 0.5, ALS, True, item_step_terms(u, p, 4))
    assert set(sums) == set(names)
    with pytest.raises(ValueError, match="als rule"):
        merchant_sums({}, int(p.nnz), 1, torch.zeros(40, dtype=torch.bool), 0.5, "fedavg", True, sums)
    compositional = item_tower_shapes(1000, dataclasses.replace(MODEL, id_rows=100))
    with pytest.raises(ConfigError, match="one row per product"):
        sum_names(compositional, ALS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"local.loss": "softmax"}, "set local.loss = 'ials'"),
        ({"local.user_solve_reg": 0.0}, "local.user_solve_reg > 0"),
        ({"model.use_content": True}, "model.use_content = false"),
        ({"model.merchant_item_bias": True}, "merchant_item_bias = false"),
        ({"federation.aggregation": "fedavg"}, "federation.aggregation = 'auto'"),
        ({"federation.robust": "median"}, "federation.robust = 'none'"),
        ({"federation.fraction": 0.5}, "federation.fraction = 1"),
        ({"federation.server.name": "fedadam"}, "federation.server.lr = 1"),
        ({"federation.server.lr": 0.5}, "federation.server.lr = 1"),
        ({"federation.upload_precision": "float16"}, "upload_precision = 'float32'"),
        ({"local.ials_item_step": "newton"}, "must be sgd or exact"),
    ],
)
def test_settings_the_exact_step_cannot_honour_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {**EXACT, **overrides})


def test_the_networked_runtime_refuses_it():
    with pytest.raises(ConfigError, match="in-process only"):
        check_networked(load_config(None, EXACT))


def test_a_refused_setting_is_one_error_line_through_the_cli(tmp_path):
    # synthetic.toml has a bias, and fedavg (the exact step is aggregated by solving: auto)
    bad = {**EXACT, "model.merchant_item_bias": False, "federation.aggregation": "auto", "federation.fraction": 0.5}
    sets = [x for k, v in bad.items() for x in ("--set", f"{k}={json.dumps(v)}")]
    result = CliRunner().invoke(app, ["train", *sets, "--set", f"output.artifacts_dir={tmp_path}"])
    assert result.exit_code != 0
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "local.ials_item_step = 'exact'" in result.output and "federation.fraction = 1" in result.output


def test_a_candidate_a_changed_federation_cannot_use_is_skipped_with_why(tiny_dataset):
    """An ablation of `make evaluate` flips the run's federation (e.g. aggregation = fedavg) and runs
    its choice again: the exact-step candidate is skipped there, and the card says why."""
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    exact = {"local.loss": "ials", "local.temperature": 1.0, "local.ials_item_step": "exact"}
    local = dataclasses.replace(LOCAL, loss="softmax", ials_item_step="sgd", temperature=0.0,
                                candidates=({"local.temperature": 1.0}, exact))  # fmt: skip
    ok = run_federated(tiny_dataset, features, MODEL, local, FederationConfig(rounds=2, patience=0, refit=False))
    assert len(ok.choice.scores) == 2 and not ok.choice.skipped
    fedavg = FederationConfig(rounds=2, patience=0, refit=False, aggregation="fedavg")
    res = run_federated(tiny_dataset, features, MODEL, local, fedavg)
    assert list(res.choice.scores) == ["local.temperature=1.0"]
    (why,) = res.choice.skipped.values()
    assert "federation.aggregation = 'auto'" in why


def test_a_file_run_with_a_merchant_bias_skips_the_exact_candidate_instead_of_refusing(tiny_dataset):
    """The exact step's limits come from the run (here its item bias), so the file default stays
    usable with `model.merchant_item_bias = true`: the other candidates are chosen between."""
    cfg = load_config(default_config_path("file"), {"data.path": "x.csv", "model.merchant_item_bias": True})
    cands = candidates_of(cfg.model, cfg.local)
    why = {c.label: unsupported(c, tiny_dataset.n_items, cfg.federation) for c in cands}
    exact = [label for label in why if "ials_item_step=exact" in label]
    assert len(exact) == 3 and all("merchant_item_bias = false" in why[label] for label in exact)
    assert [w for label, w in why.items() if label not in exact] == [None] * (len(cands) - 3)
    # a candidate's own settings that no run could honour are still refused up front
    with pytest.raises(ConfigError, match=r"local.candidates\[0\]: local.ials_alpha must be >= 0"):
        load_config(None, {"local.temperature": 0, "local.candidates": [{**EXACT_CANDIDATE, "local.ials_alpha": -1}]})


@pytest.mark.parametrize(
    ("own", "names"),
    [
        ({"model.merchant_item_bias": True}, "model.merchant_item_bias = false"),
        ({"local.loss": "softmax"}, "local.loss = 'ials'"),
        ({"local.user_solve_reg": 0.0}, "local.user_solve_reg > 0"),
        ({"model.use_content": True}, "model.use_content = false"),
    ],
)
def test_a_candidate_that_breaks_the_exact_step_by_itself_is_refused_up_front(own, names):
    """What the candidate's own settings break no run can give, so the config refuses it, naming
    the candidate and the setting, rather than a run skipping it after the others have trained."""
    bad = {**EXACT_CANDIDATE, "model.use_content": False, **own}
    with pytest.raises(ConfigError, match=r"local.candidates\[1\]: local.ials_item_step = 'exact'") as err:
        load_config(None, {"local.temperature": 0, "local.candidates": [{"local.temperature": 1.0}, bad]})
    assert names in str(err.value)
    # the same candidate without its own breaking setting loads (the run's limits are checked at run time)
    fine = {**EXACT_CANDIDATE, "model.use_content": False}
    cfg = load_config(None, {"local.temperature": 0, "local.candidates": [fine]})
    assert cfg.local.candidates[0]["local.ials_item_step"] == "exact"
