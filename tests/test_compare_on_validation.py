"""`fedrec compare-on-validation`: candidates parsed as typed values, the winner and whether its
lead exceeds the spread, and an end-to-end run that writes its JSON."""

import json

import pytest
from typer.testing import CliRunner

from fedrec.errors import ConfigError
from fedrec.training import compare_on_validation as cov
from fedrec.training.cli import app
from tests.test_cli import tiny_args


def test_candidates_are_typed_and_at_least_two():
    assert cov.parse_candidates("fedavg, rowwise") == ["fedavg", "rowwise"]
    assert cov.parse_candidates("0.5,1,true") == [0.5, 1, True]
    with pytest.raises(ConfigError, match="at least two"):
        cov.parse_candidates("fedavg")


def test_the_winner_and_whether_its_lead_exceeds_the_spread():
    clear = cov.summarise({"a": [0.30, 0.31, 0.32], "b": [0.20, 0.21, 0.22]})
    assert clear["best"] == "a" and clear["runner_up"] == "b" and clear["clear"]
    assert clear["lead"] == pytest.approx(0.10)
    assert clear["stats"]["a"]["std"] == pytest.approx(0.01)
    within = cov.summarise({"a": [0.30, 0.26, 0.34], "b": [0.29, 0.30, 0.31]})
    assert within["best"] == "a" and not within["clear"]  # lead 0.0 < spread 0.04


def test_compare_on_validation_end_to_end(tmp_path, tiny_csv):
    result = CliRunner().invoke(
        app,
        [
            "compare-on-validation",
            *tiny_args(tmp_path, tiny_csv),
            "--setting",
            "federation.aggregation",
            "--candidates",
            "fedavg,rowwise",
            "--seeds",
            "2",
        ],  # fmt: skip
    )
    assert result.exit_code == 0, result.output
    out = json.loads((tmp_path / "results" / "validation-federation.aggregation-file.json").read_text())
    assert set(out["val_recall@20"]) == {"fedavg", "rowwise"}
    assert all(len(v) == 2 and all(0 <= x <= 1 for x in v) for v in out["val_recall@20"].values())
    assert out["best"] in ("fedavg", "rowwise") and out["seeds"] == [0, 1]
    assert all(1 <= r <= 3 for v in out["best_round"].values() for r in v)  # rounds = 3, no refit

    bad = CliRunner().invoke(
        app, ["compare-on-validation", *tiny_args(tmp_path, tiny_csv), "--setting", "local.nope", "--candidates", "1,2"]
    )
    assert bad.exit_code == 2 and "unknown setting(s) nope" in bad.output
    for tag, ok in (("split", True), ("../x", False)):  # a tag names the file apart; never a path
        args = [*tiny_args(tmp_path, tiny_csv), "--setting", "local.epochs", "--candidates", "1,2", "--seeds", "1"]
        res = CliRunner().invoke(app, ["compare-on-validation", *args, "--tag", tag])
        assert (res.exit_code == 0) is ok, res.output
    assert (tmp_path / "results" / "validation-local.epochs-split-file.json").is_file()
    assert "--tag '../x'" in res.output and "Traceback" not in res.output
    # no validation slice: one error line, not a results file of NaN scores
    args = [*tiny_args(tmp_path, tiny_csv), "--set", "data.val_fraction=0", "--setting", "local.epochs"]
    res = CliRunner().invoke(app, ["compare-on-validation", *args, "--candidates", "1,2", "--seeds", "1", "--tag", "e"])
    assert res.exit_code == 2 and "no validation customers" in res.output, res.output
    assert not (tmp_path / "results" / "validation-local.epochs-e-file.json").exists()


def test_under_dp_each_candidate_is_scored_on_the_round_dp_releases(tmp_path, tiny_csv):
    """Under DP the last round is released, so that round's validation recall is what is compared."""
    from fedrec.config import load_config
    from fedrec.training.compare_on_validation import best_val_recall

    base = {
        "data.dataset": "file", "data.path": str(tiny_csv), "federation.rounds": 3, "model.dim": 16,
        "model.hash_buckets": 1024, "privacy.sample_rate": 0.5,
    }  # fmt: skip
    cfg = load_config(None, {**base, "privacy.epsilon": 8.0})
    val, rnd = best_val_recall(cfg)
    assert rnd == cfg.federation.rounds and 0 <= val <= 1
    plain, _ = best_val_recall(load_config(None, base))
    assert val != plain  # the DP run was trained with DP (noise), not as the non-private one
