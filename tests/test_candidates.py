"""local.candidates: whole setting sets (loss, temperature, tower size) chosen on the validation slice."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fedrec.config import load_config
from fedrec.content_profiles import basket_matrix, with_basket_profiles
from fedrec.errors import ConfigError
from fedrec.features import build_item_features
from fedrec.federated.candidates import candidates_of
from fedrec.federated.local import LocalConfig
from fedrec.federated.simulation import FederationConfig, run_federated
from fedrec.ials_users import solve_ials_baskets
from fedrec.model import ModelConfig
from fedrec.serving.export_store import load_export
from fedrec.serving.foldin import FoldInConfig
from fedrec.serving.recommend import basket_vectors
from fedrec.training.cli import app, default_config_path

MODEL = ModelConfig(dim=16, feature_dim=16, hidden=32, hash_buckets=1024)
LOCAL = LocalConfig(batch_size=128, lr=0.01, user_lr=0.05, temperature=0.0)
SOFTMAX = {"local.temperature": 1.0}
IALS = {"local.loss": "ials", "local.temperature": 1.0, "model.dim": 8, "model.use_content": False}
# A softmax that cannot learn (no steps that move anything): the ials candidate must win against it.
FROZEN = {"local.temperature": 1.0, "local.lr": 1e-12, "local.user_lr": 1e-12, "local.user_solve_reg": 0.0}


@pytest.fixture(scope="module")
def features(tiny_dataset):
    return build_item_features(tiny_dataset.items, MODEL.hash_buckets)


def best_val(res) -> float:
    return {h.round: h.val_recall_at_20 for h in res.history}[res.best_round]


def test_each_candidate_overrides_the_runs_settings():
    a, b = candidates_of(MODEL, dataclasses.replace(LOCAL, candidates=(SOFTMAX, IALS)))
    assert (a.local.loss, a.local.temperature, a.model.dim) == ("softmax", 1.0, 16)
    assert (b.local.loss, b.model.dim, b.model.use_content, b.model.hidden) == ("ials", 8, False, 32)
    assert b.label == "local.loss=ials, local.temperature=1.0, model.dim=8, model.use_content=false"
    assert a.local.candidates == () and b.local.candidates == ()  # a candidate chooses nothing itself
    # a set temperature fixes the settings, whatever candidates are listed
    assert candidates_of(MODEL, dataclasses.replace(LOCAL, temperature=0.5, candidates=(SOFTMAX, IALS))) == []


def test_the_choice_is_the_best_validation_candidate_trained_with_its_own_settings(tiny_dataset, features):
    cfg = FederationConfig(rounds=3, patience=0, refit=False)
    local = dataclasses.replace(LOCAL, candidates=(SOFTMAX, IALS))
    runs = {
        c.label: (c, run_federated(tiny_dataset, features, c.model, c.local, cfg)) for c in candidates_of(MODEL, local)
    }
    scores = {label: best_val(r) for label, (_, r) in runs.items()}
    assert len(set(scores.values())) == 2  # the candidates differ: the choice means something
    best = max(scores, key=scores.get)

    chosen = run_federated(tiny_dataset, features, MODEL, local, cfg)
    assert chosen.choice.label == best and chosen.choice.scores == scores
    cand, run = runs[best]
    assert chosen.choice.model == cand.model and chosen.choice.local == cand.local
    for k, v in run.item_state.items():
        assert torch.equal(chosen.item_state[k], v)


def test_a_model_setting_reaches_the_refit(tiny_dataset, features):
    cfg = FederationConfig(rounds=3, patience=0, refit=True)
    chosen = run_federated(tiny_dataset, features, MODEL, dataclasses.replace(LOCAL, candidates=(FROZEN, IALS)), cfg)
    assert chosen.choice.local.loss == "ials" and chosen.choice.model.dim == 8
    assert chosen.refit_rounds >= 1
    ials = candidates_of(MODEL, dataclasses.replace(LOCAL, candidates=(IALS,)))[0]
    fixed = run_federated(tiny_dataset, features, ials.model, ials.local, cfg)
    assert chosen.item_state.keys() == fixed.item_state.keys()
    for k, v in fixed.item_state.items():
        assert torch.equal(chosen.item_state[k], v)
    assert chosen.item_state["item_emb.weight"].shape[1] == 8


def test_a_candidate_the_catalogue_cannot_train_is_skipped(tiny_dataset, features):
    cfg = FederationConfig(rounds=2, patience=0, refit=False)
    small = dataclasses.replace(LOCAL, full_softmax_max_items=10, candidates=(SOFTMAX, IALS))
    res = run_federated(tiny_dataset, features, MODEL, small, cfg)
    assert res.choice.label == "local.temperature=1.0"
    assert list(res.choice.skipped) == [candidates_of(MODEL, small)[1].label]
    assert "at most 10 items" in next(iter(res.choice.skipped.values()))
    with pytest.raises(ConfigError, match="no candidate can train"):
        run_federated(tiny_dataset, features, MODEL, dataclasses.replace(small, candidates=(IALS,)), cfg)


def test_an_exact_ials_candidate_runs_above_the_switch_with_one_id_row_per_product(tiny_dataset, features):
    """The exact item step scores no softmax, so the full-softmax switch does not skip it; a
    compositional id table (more than 2 x id_rows products) does, with the setting to change."""
    exact = {**IALS, "local.ials_item_step": "exact", "local.user_solve_reg": 3.0}
    small = dataclasses.replace(LOCAL, full_softmax_max_items=10, candidates=(SOFTMAX, exact))
    fed = FederationConfig(rounds=2, patience=0, refit=False)
    assert tiny_dataset.n_items > 10
    ran = run_federated(tiny_dataset, features, MODEL, small, fed)
    assert not ran.choice.skipped and set(ran.choice.scores) == {c.label for c in candidates_of(MODEL, small)}
    shared = dataclasses.replace(MODEL, id_rows=tiny_dataset.n_items // 2 - 1)  # two compositional tables
    res = run_federated(tiny_dataset, features, shared, small, fed)
    assert res.choice.label == "local.temperature=1.0"
    (why,) = res.choice.skipped.values()
    assert "one id row per product" in why and "model.id_rows = 0" in why


def test_the_file_default_lists_softmax_temperatures_and_ials():
    cfg = load_config(default_config_path("file"), {"data.path": "x.csv"})
    labels = [c.label for c in candidates_of(cfg.model, cfg.local)]
    assert labels == [
        "local.temperature=0.5", "local.temperature=1.0", "local.temperature=2.0",
        "local.temperature=1.0, local.user_lr=0.05, model.merchant_item_bias=true, model.use_content=false",
        *(f"local.loss=ials, local.ials_item_step=exact, local.ials_alpha={a}, local.temperature=1.0, model.dim=16,"
          " model.use_content=false" for a in (5.0, 10.0, 20.0)),
    ]  # fmt: skip
    # values as the settings hold them, from TOML tables or --set JSON alike
    one = load_config(None, {"local.temperature": 0, "local.candidates": [{"local": {"temperature": 2}}]})
    assert one.local.candidates == ({"local.temperature": 2.0},)
    assert isinstance(one.local.candidates[0]["local.temperature"], float)
    # a set temperature fixes the settings, so candidates that DP could not train are not checked
    assert load_config(default_config_path("file"), {"data.path": "x", "local.temperature": 1, "privacy.epsilon": 8})


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        ({"model.hash_buckets": 10}, r"local.candidates\[0\]: model.hash_buckets cannot differ"),
        ({"federation.rounds": 3}, r"local.candidates\[0\]: federation.rounds cannot differ"),
        ({"local.candidates": []}, "local.candidates cannot differ"),
        ({}, "empty candidate"),
        ({"local.temperature": 0.0}, r"local.candidates\[0\]: local.temperature = 0 inside a candidate"),
        ({"local.loss": "nope", "local.temperature": 1.0}, r"local.candidates\[0\]: .*local.loss"),
        ({"local.loss": "ials"}, r"local.candidates\[0\]: .*ials loss has none"),  # the run's temperature is 0
        ({"model.dim": "big", "local.temperature": 1.0}, r"local.candidates\[0\]: model.dim: expected int"),
    ],
)
def test_a_bad_candidate_is_refused_naming_it(candidate, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"local.temperature": 0, "local.candidates": [candidate]})


def test_cli_reports_a_bad_candidate_without_a_traceback(tiny_csv):
    result = CliRunner().invoke(app, ["train", "--dataset", "file", "--set", f"data.path={tiny_csv}",
                                      "--set", 'local.candidates=[{"model.hash_buckets": 9}]'])  # fmt: skip
    assert result.exit_code == 2
    assert "local.candidates[0]: model.hash_buckets cannot differ" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def train_tiny_file(tmp_path, tiny_csv, candidates: list[dict]):
    """`fedrec train` on the tiny shop's file choosing among `candidates`: (CLI result, its model card)."""
    sets = json.dumps(candidates)
    args = [
        "train", "--dataset", "file", "--set", f"data.path={tiny_csv}",
        "--set", f"output.artifacts_dir={tmp_path / 'artifacts'}", "--set", "federation.rounds=2",
        "--set", "model.dim=16", "--set", "model.hash_buckets=1024", "--set", f"local.candidates={sets}",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    card = tmp_path / "artifacts" / "file" / "exports" / "v0001" / "model_card.json"
    return result, json.loads(card.read_text())


def test_an_export_of_a_chosen_ials_model_serves_it(tmp_path, tiny_csv):
    result, card = train_tiny_file(tmp_path, tiny_csv, [FROZEN, IALS])
    shown = " ".join(result.output.split())
    assert "chosen on validation recall@20: local.loss=ials" in shown
    assert "candidate local.loss=ials" in shown and "candidate local.temperature=1.0" in shown  # each run named
    root = tmp_path / "artifacts" / "file"
    assert (
        card["validation_choice"]["chosen"]
        == "local.loss=ials, local.temperature=1.0, model.dim=8, model.use_content=false"
    )
    frozen = ", ".join(f"{k}={v}" for k, v in FROZEN.items())
    assert set(card["validation_choice"]["val_recall@20"]) == {card["validation_choice"]["chosen"], frozen}
    model = card["config"]["model"]
    assert (card["config"]["local"]["loss"], model["dim"], model["use_content"]) == ("ials", 8, False)
    export = load_export(root / "exports")
    weight, width = export.content_match  # chosen on validation after training; (0, 0): none
    co_weight, co_width = export.copurchase  # the file default's co-purchase term, chosen the same way
    assert export.item_vectors.shape[1] == 8 + width + co_width
    basket = [np.array([0, 1, 2])]
    loss = export.training_loss
    tower = export.item_vectors[:, :8]  # ALS's user step against the trained vectors, then w p, then w x
    want = solve_ials_baskets(tower, basket, loss["ials_alpha"], loss["user_solve_reg"])
    if width:
        want = with_basket_profiles(want, basket, export.item_vectors[:, 8 : 8 + width], weight)
    if co_width:
        bought = basket_matrix(basket, export.item_vectors.shape[0])[:, :co_width].toarray()
        want = np.hstack([want, co_weight * bought]).astype(np.float32)
    np.testing.assert_allclose(basket_vectors(export, basket, FoldInConfig()), want, rtol=1e-5, atol=1e-6)


def test_a_chosen_merchant_bias_candidate_keeps_each_merchants_bias_at_home(tmp_path, tiny_csv):
    """model.merchant_item_bias may differ between candidates: the shared tower is the same shape,
    and the chosen one's per-merchant biases are written to each merchant's own export only."""
    bias = {"local.temperature": 1.0, "model.merchant_item_bias": True}
    _, card = train_tiny_file(tmp_path, tiny_csv, [FROZEN, bias])
    root = tmp_path / "artifacts" / "file"
    assert card["validation_choice"]["chosen"] == "local.temperature=1.0, model.merchant_item_bias=true"
    assert card["config"]["model"]["merchant_item_bias"] is True
    assert not list((root / "exports").rglob("item_bias.npy"))  # never in the shared export
    biases = sorted((root / "merchants").glob("*/v0001/item_bias.npy"))
    assert len(biases) == len(card["merchants"]) >= 2
    values = [np.load(p) for p in biases]
    assert all(v.shape == (card["data"]["items"],) for v in values)
    assert not np.allclose(values[0], values[1])  # each merchant's own, trained on its own customers
