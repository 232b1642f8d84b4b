"""local.temperature = 0: the softmax temperature chosen on the validation slice (a new shop's file)."""

import dataclasses
import json

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from fedrec.config import check_networked, load_config
from fedrec.datasets.marketplace import NEW_SHOP, write_purchase_file
from fedrec.datasets.purchases import load as load_purchases
from fedrec.errors import ConfigError
from fedrec.features import build_item_features
from fedrec.federated import simulation
from fedrec.federated.local import LocalConfig, local_update
from fedrec.federated.simulation import FederationConfig, run_federated, with_validation_in_train
from fedrec.model import ModelConfig, initial_item_state
from fedrec.privacy.accountant import plan_mechanism
from fedrec.privacy.config import PrivacyConfig
from fedrec.training.cli import app, default_config_path

MODEL = ModelConfig(dim=16, feature_dim=16, hidden=32, hash_buckets=1024)
LOCAL = LocalConfig(batch_size=128, weight_decay=0.1, lr=0.01, user_lr=0.05)
CANDIDATES = (0.25, 1.0, 4.0)
AUTO = dataclasses.replace(LOCAL, temperature=0.0, temperature_candidates=CANDIDATES)


@pytest.fixture(scope="module")
def features(tiny_dataset):
    return build_item_features(tiny_dataset.items, MODEL.hash_buckets)


def best_val(res) -> float:
    return {h.round: h.val_recall_at_20 for h in res.history}[res.best_round]


def test_the_choice_is_the_candidate_with_the_best_validation_and_that_very_run(tiny_dataset, features):
    cfg = FederationConfig(rounds=3, patience=0, refit=False)
    runs = {t: run_federated(tiny_dataset, features, MODEL, dataclasses.replace(LOCAL, temperature=t), cfg)
            for t in CANDIDATES}  # fmt: skip
    scores = {t: best_val(r) for t, r in runs.items()}
    assert len(set(scores.values())) == len(CANDIDATES)  # the candidates differ: the choice means something
    best = max(scores, key=scores.get)

    chosen = run_federated(tiny_dataset, features, MODEL, AUTO, cfg)
    assert chosen.temperature == best
    assert chosen.choice.scores == {str(t): s for t, s in scores.items()}
    assert chosen.best_round == runs[best].best_round
    for k, v in runs[best].item_state.items():
        assert torch.equal(chosen.item_state[k], v)


def test_every_candidates_training_time_counts_in_the_results(tiny_dataset, features, monkeypatch):
    # Each run's time is pinned (wall times of separate runs vary with the machine's load), so the
    # sum is exact: the choice cost one run per candidate, whichever was kept.
    train = simulation._train
    pinned = iter([100.0, 20.0, 3.0])
    monkeypatch.setattr(simulation, "_train", lambda *a, **k: dataclasses.replace(train(*a, **k), seconds=next(pinned)))
    chosen = run_federated(tiny_dataset, features, MODEL, AUTO, FederationConfig(rounds=2, patience=0, refit=False))
    assert len(chosen.choice.scores) == len(CANDIDATES)
    assert chosen.seconds == pytest.approx(123.0)


def test_the_refit_trains_with_the_chosen_temperature(tiny_dataset, features):
    cfg = FederationConfig(rounds=3, patience=0, refit=True)
    chosen = run_federated(tiny_dataset, features, MODEL, AUTO, cfg)
    same = dataclasses.replace(LOCAL, temperature=chosen.temperature)
    fixed = run_federated(tiny_dataset, features, MODEL, same, cfg)
    assert chosen.refit_rounds == fixed.refit_rounds >= 1
    for k, v in fixed.item_state.items():
        assert torch.equal(chosen.item_state[k], v)
    assert chosen.early_stopped is not None and chosen.early_stopped.temperature == chosen.temperature


def test_without_a_validation_slice_or_under_dp_the_choice_refuses(tiny_dataset, features):
    cfg = FederationConfig(rounds=2, patience=0, refit=False)
    with pytest.raises(ConfigError, match="val_fraction"):
        run_federated(with_validation_in_train(tiny_dataset), features, MODEL, AUTO, cfg)
    dp = plan_mechanism(PrivacyConfig(epsilon=8.0), 2, 1)
    with pytest.raises(ConfigError, match="DP"):
        run_federated(tiny_dataset, features, MODEL, AUTO, cfg, dp=dp)
    m = tiny_dataset.merchants[0]
    with pytest.raises(ValueError, match="temperature"):
        local_update(initial_item_state(tiny_dataset.n_items, MODEL, 0), torch.zeros(m.n_users, 16), m.train,
                     features, MODEL, AUTO, 0)  # fmt: skip


def test_config_reads_the_candidates_and_refuses_what_cannot_run():
    cfg = load_config(default_config_path("file"), {"data.path": "x.csv"})
    assert cfg.local.temperature == 0 and cfg.local.temperature_candidates == (0.5, 1.0, 2.0)
    assert load_config(None, {"local.temperature_candidates": [1, 3]}).local.temperature_candidates == (1, 3)
    for overrides, message in (
        ({"local.temperature": -1.0}, "local.temperature"),
        ({"local.temperature_candidates": []}, "temperature_candidates"),
        ({"local.temperature_candidates": [1.0, 0.0]}, "temperature_candidates"),
        ({"local.temperature_candidates": "abc"}, "temperature_candidates: expected list"),
        ({"local.temperature": 0.0, "privacy.epsilon": 8.0}, "DP"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
    with pytest.raises(ConfigError, match="in-process only"):
        check_networked(load_config(None, {"local.temperature": 0.0}))
    # the shipped datasets keep the temperature each chose
    for name, t in (("synthetic", 1.0), ("movielens-100k", 0.5)):
        assert load_config(default_config_path(name)).local.temperature == t


def test_a_trained_export_serves_the_chosen_temperature(tmp_path, tiny_csv):
    args = [
        "train", "--dataset", "file", "--set", f"data.path={tiny_csv}",
        "--set", f"output.artifacts_dir={tmp_path / 'artifacts'}", "--set", "federation.rounds=2",
        "--set", "model.dim=16", "--set", "model.hash_buckets=1024",
        "--set", 'local.candidates=[{"local.temperature": 0.5}, {"local.temperature": 2.0}]',
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "chosen on validation recall@20" in result.output
    card = json.loads((tmp_path / "artifacts" / "file" / "exports" / "v0001" / "model_card.json").read_text())
    scores = card["validation_choice"]["val_recall@20"]
    assert set(scores) == {"local.temperature=0.5", "local.temperature=2.0"}
    best = max(scores, key=scores.get)
    assert card["validation_choice"]["chosen"] == best
    assert card["config"]["local"]["temperature"] == float(best.split("=")[1])


def test_generate_shop_writes_a_purchase_file_without_metadata(tmp_path):
    small = dataclasses.replace(NEW_SHOP, n_products=2_000, n_customers=300, mean_baskets=5.0)
    path = tmp_path / "shop.csv"
    rows = write_purchase_file(path, small)
    assert pl.read_csv(path).columns == ["merchant", "user", "item", "timestamp"]
    log = load_purchases(path)
    assert log.interactions.height == rows > 0
    assert log.interactions["merchant"].n_unique() == small.n_merchants
    assert 0.9 * small.n_customers <= log.interactions["user"].n_unique() <= small.n_customers
    assert not list(tmp_path.glob("*.tmp*"))


def test_evaluate_records_each_methods_chosen_temperature(tiny_csv):
    from rich.console import Console

    from fedrec.training.evaluate import evaluate, markdown_table

    cfg = load_config(default_config_path("file"), {
        "data.path": str(tiny_csv), "federation.rounds": 2, "model.dim": 16, "model.hash_buckets": 1024,
        "local.candidates": [{"local.temperature": 0.5}, {"local.temperature": 2.0}],
    })  # fmt: skip
    res = evaluate(cfg, Console(quiet=True), quiet_rounds=True, seeds=(0,), ablations=False)
    for method in ("federated", "centralized"):
        assert res[method]["temperature_per_seed"][0] in (0.5, 2.0)
        assert res[method]["choice_per_seed"][0] == f"local.temperature={res[method]['temperature_per_seed'][0]}"
    # local-only: every merchant chooses alone, on its own validation slice
    (alone,) = res["local_only"]["choice_per_merchant_per_seed"]
    assert set(alone) == set(res["federated"]["per_merchant"])
    assert set(alone.values()) <= {"local.temperature=0.5", "local.temperature=2.0"}
    assert "Settings chosen on validation" in markdown_table(res)


def test_a_file_run_with_dp_says_what_to_set(tiny_csv):
    args = ["train", "--dataset", "file", "--set", f"data.path={tiny_csv}", "--set", "privacy.epsilon=8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "with privacy on, set local.temperature" in " ".join(result.output.split())
    assert "Traceback" not in result.output


def test_an_error_naming_a_config_table_keeps_its_brackets(tiny_csv):
    args = ["evaluate", "--dataset", "file", "--set", f"data.path={tiny_csv}", "--set", "privacy.epsilon=8",
            "--set", "local.temperature=0.5"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "unset [privacy]" in " ".join(result.output.split())
