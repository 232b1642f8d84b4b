"""The command line as a user runs it: train -> export directories, re-export, clear errors."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from fedrec.serving.index import load_index
from fedrec.training.cli import app

runner = CliRunner()


def tiny_args(tmp_path, csv):
    return [
        "--dataset",
        "file",
        "--set",
        f"data.path={csv}",
        "--set",
        f"output.artifacts_dir={tmp_path / 'artifacts'}",
        "--set",
        f"output.results_dir={tmp_path / 'results'}",
        "--set",
        "federation.rounds=3",
        "--set",
        "model.dim=16",
        "--set",
        "model.hash_buckets=1024",
        # the file default (0) trains once per candidate temperature: tests/test_temperature_choice.py
        "--set",
        "local.temperature=0.5",
    ]


def test_train_writes_a_complete_versioned_export(tmp_path, tiny_csv):
    result = runner.invoke(app, ["train", *tiny_args(tmp_path, tiny_csv)])
    assert result.exit_code == 0, result.output
    assert "final test recall@20" in result.output
    root = tmp_path / "artifacts" / "file"
    export = root / "exports" / "v0001"
    assert (root / "exports" / "LATEST").read_text().strip() == "v0001"
    assert {p.name for p in export.iterdir()} == {
        "item_embeddings.npy",
        "index.faiss",
        "items.parquet",
        "item_tower.pt",
        "model_card.json",
    }
    vecs = np.load(export / "item_embeddings.npy")
    items = pl.read_parquet(export / "items.parquet")
    index = load_index(export / "index.faiss")
    assert vecs.shape[0] == items.height == index.ntotal
    _, ids = index.search(vecs[:5], 3)
    assert ids.tolist() == np.argsort(-(vecs[:5] @ vecs.T), axis=1)[:, :3].tolist()
    card = json.loads((export / "model_card.json").read_text())
    match = card["content_match"]  # chosen on validation; above weight 0 its block follows the tower's 16
    width = match["basis_rank"] if match and match["weight"] > 0 else 0
    term = card["copurchase"]  # the file default's co-purchase term, chosen the same way; its block is last
    width += term["width"] if term and term["weight"] > 0 else 0
    assert card["rounds"] == 3 and card["dim"] == 16 + width and set(card["merchants"]) == {"big", "small_a", "small_b"}
    assert card["federation"]["aggregation"] == "rowwise"  # auto, as resolved for one id row per product
    # user data only under each merchant's own directory
    assert not any("user" in p.name for p in export.iterdir())
    for m in ("big", "small_a", "small_b"):
        mdir = root / "merchants" / m / "v0001"
        users = pl.read_parquet(mdir / "users.parquet")
        assert np.load(mdir / "user_embeddings.npy").shape == (users.height, 16 + width)
    # no temporary directories left behind
    assert not [p for p in root.rglob("*.tmp")]

    again = runner.invoke(app, ["export", *tiny_args(tmp_path, tiny_csv)])
    assert again.exit_code == 0, again.output
    assert (root / "exports" / "LATEST").read_text().strip() == "v0002"
    assert np.allclose(np.load(root / "exports" / "v0002" / "item_embeddings.npy"), vecs, atol=1e-5)


def test_bad_input_is_one_clear_line_not_a_traceback(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("user,item,when\nu,i,1\n")
    result = runner.invoke(app, ["train", "--dataset", "file", "--set", f"data.path={bad}"])
    assert result.exit_code == 2
    assert "bad.csv: missing required column(s) 'timestamp'" in result.output
    assert "Traceback" not in result.output
    # the file's own name for a column, set on the command line, is the one the message names
    result = runner.invoke(
        app, ["train", "--dataset", "file", "--set", f"data.path={bad}", "--set", "data.timestamp_column=ordered_at"]
    )
    assert result.exit_code == 2 and "bad.csv: missing required column(s) 'ordered_at'" in result.output

    cfg = tmp_path / "run.toml"
    cfg.write_text("[local]\nlearning_rate = 0.1\n")
    result = runner.invoke(app, ["train", "--config", str(cfg)])
    assert result.exit_code == 2 and "unknown setting(s) learning_rate" in result.output
    # the file's own mistake names the file, a --set added to it or not; a mistyped --set over a
    # file the user never edited names the command line, not that file
    result = runner.invoke(app, ["train", "--config", str(cfg), "--set", "threads=1"])
    assert result.exit_code == 2 and f"error: {cfg}: local: unknown setting(s) learning_rate" in result.output
    result = runner.invoke(app, ["train", "--dataset", "file", "--set", f"data.path={bad}", "--set", "output_dir=x"])
    assert result.exit_code == 2, result.output
    assert "error: the command line's settings (over " in result.output
    assert "unknown setting(s) output_dir" in result.output
    cfg.write_text("[local]\nlr = 0.1\n")
    result = runner.invoke(app, ["train", "--config", str(cfg), "--set", "local.temperature=-2"])
    assert result.exit_code == 2 and f"the command line's settings (over {cfg}): local.temperature" in result.output

    result = runner.invoke(app, ["export", "--set", f"output.artifacts_dir={tmp_path / 'none'}"])
    assert result.exit_code == 2 and "no checkpoint" in result.output
    # a truncated checkpoint (a full disk) or another program's file: named, not unpickled into a traceback
    broken = tmp_path / "broken"
    (broken / "synthetic").mkdir(parents=True)
    (broken / "synthetic" / "checkpoint.pt").write_bytes(b"PK\x03\x04 truncated")
    result = runner.invoke(app, ["export", "--set", f"output.artifacts_dir={broken}"])
    assert result.exit_code == 2 and "checkpoint.pt: cannot read the checkpoint" in result.output, result.output
    torch.save({"weights": 1}, broken / "synthetic" / "checkpoint.pt")
    result = runner.invoke(app, ["export", "--set", f"output.artifacts_dir={broken}"])
    assert result.exit_code == 2 and "not a fedrec checkpoint (missing config, item_state" in result.output

    result = runner.invoke(app, ["evaluate", "--only-cold-start", "--only-references"])
    assert result.exit_code == 2 and "--only-cold-start and --only-references: give one" in result.output
    empty = f"output.results_dir={tmp_path / 'none'}"
    result = runner.invoke(app, ["evaluate", "--dataset", "synthetic", "--only-references", "--set", empty])
    assert result.exit_code == 2 and "no results file to update" in result.output

    for setting, message in (
        ("data.partition=random", "data.partition must be one of"),
        ("data.partition_merchants=5000", "data.partition_merchants must be between 2 and 1000"),
        ("data.partition_alpha=0", "data.partition_alpha must be > 0"),
        ("local.prox_mu=-1", "local.prox_mu must be >= 0"),
        ("network.max_failed_rounds=0", "network.max_failed_rounds must be >= 1"),
        ("federation.aggregation=mean", "federation.aggregation must be one of ('auto', 'fedavg', 'rowwise')"),
        ("data.user_column=item", "must be four different non-empty column names"),
        ("data.timestamp_column=", "must be four different non-empty column names"),
        # each of these once ended in a traceback, or trained with a meaningless setting
        ("threads=0", "threads must be >= 1"),
        ("model.hash_buckets=0", "model.hash_buckets must be >= 1"),
        ("model.hidden=0", "model.hidden must be >= 1"),
        ("local.lr=-1", "local.lr must be a finite number >= 0"),
        ("local.user_lr=NaN", "local.user_lr must be a finite number >= 0"),
        ("local.weight_decay=-0.1", "local.weight_decay must be a finite number >= 0"),
        ("federation.server.beta2=1", "federation.server.beta1 and beta2 must be in [0, 1)"),
        ("federation.patience=-1", "federation.patience must be >= 0"),
        ("data.min_positives=0", "data.min_positives must be >= 1"),
        ("federation.seed=-1", "federation.seed must be an integer in [0, 2^32)"),
        ("federation.seed=9223372036854775807", "federation.seed must be an integer in [0, 2^32)"),
        # the setting out of range is the one named, not a rule that combines it with another
        ("local.loss=xyz", "local.loss must be one of"),
        # candidates under a fixed temperature are not used, but a list that is not candidates is named
        ("local.candidates=[1]", "local.candidates[0]: expected a table of settings, got int"),
    ):
        result = runner.invoke(app, ["train", "--set", setting])
        assert result.exit_code == 2, setting
        assert message in result.output and "Traceback" not in result.output, (setting, result.output)
    result = runner.invoke(
        app, ["train", "--dataset", "file", "--set", "data.path=x.csv", "--set", "privacy.epsilon=0"]
    )
    assert result.exit_code == 2 and "privacy.epsilon must be > 0" in result.output, result.output
    # a section given a value, then one of its settings: named, not a TypeError
    result = runner.invoke(app, ["train", "--set", "federation=1", "--set", "federation.rounds=2"])
    assert result.exit_code == 2 and "federation.rounds: federation is a table of settings" in result.output
    assert "Traceback" not in result.output
    # an output folder under a file: refused before training, not a traceback at the export
    afile = tmp_path / "afile"
    afile.write_text("x")
    for setting in ("output.artifacts_dir", "output.results_dir"):
        result = runner.invoke(app, ["train", "--set", f"{setting}={afile / 'sub'}"])
        assert result.exit_code == 2 and f"{afile} is a file, not a folder" in result.output, result.output
    result = runner.invoke(app, ["train", "--set", "nope=1"])
    assert result.exit_code == 2 and ": : " not in result.output and "unknown setting(s) nope" in result.output

    # comma-separated numbers: refused before any run, with the message for the kind of mistake
    for flags, message in (
        (["privacy-report", "--epsilons", "1,x"], "--epsilons '1,x': expected numbers or inf, e.g. 1,8,inf"),
        (["privacy-report", "--epsilons", "0,8"], "--epsilons '0,8': every budget must be > 0 (inf = no DP)"),
        (["privacy-report", "--epsilons", "nan"], "--epsilons 'nan': every budget must be > 0"),
        (["privacy-report", "--epsilons", ","], "--epsilons ',': every budget must be > 0"),
        (["attack-report", "--clip-multiples", "nan"], "--clip-multiples 'nan': expected comma-separated numbers >= 1"),
        (["attack-report", "--direction", "up"], "--direction 'up': choose one of fresh, fixed, popular"),
        (["attack-report", "--through", "mlp"], "--through 'mlp': choose one of id, tokens"),
        (["attack-report", "--sum-clips", "0.5"], "--sum-clips '0.5': expected comma-separated numbers >= 1"),
        (["attack-report", "--through", "tokens"], "--through tokens: this model has no content tower"),
        (["attack-report", "--groups", "2"], "--groups 2: groups the merchants for a robust rule"),
        (["attack-report", "--rules", "none", "--groups", "3"], "--groups 3: groups the merchants for a robust rule"),
    ):
        result = runner.invoke(app, flags)
        assert result.exit_code == 2, flags
        assert message in result.output and "Traceback" not in result.output, result.output


def test_a_dirichlet_partition_trains_end_to_end(tmp_path, tiny_csv):
    """Customers regrouped into 4 category-skewed merchants (m000..m003), trained and exported."""
    args = ["train", "--dataset", "file", "--set", f"data.path={tiny_csv}"]
    for setting in (
        f"output.artifacts_dir={tmp_path / 'a'}",
        "data.partition=dirichlet",
        "data.partition_merchants=4",
        "data.partition_alpha=0.3",
        "federation.rounds=2",
        "local.prox_mu=0.1",
        "model.dim=8",
        "model.hash_buckets=256",
    ):
        args += ["--set", setting]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    merchants = sorted(p.name for p in (tmp_path / "a" / "file" / "merchants").iterdir())
    assert merchants and set(merchants) <= {"m000", "m001", "m002", "m003"}


def test_yaml_config(tmp_path, tiny_csv):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"data:\n  dataset: file\n  path: {tiny_csv}\nfederation:\n  rounds: 1\nmodel:\n  dim: 8\n"
        f"output:\n  artifacts_dir: {tmp_path / 'a'}\n"
    )
    result = runner.invoke(app, ["train", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "file" / "exports" / "v0001").is_dir()


def test_train_with_merchant_bias_keeps_it_in_the_merchant_dirs_only(tmp_path, tiny_csv):
    args = [*tiny_args(tmp_path, tiny_csv), "--set", "model.merchant_item_bias=true"]
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output
    root = tmp_path / "artifacts" / "file"
    n_items = pl.read_parquet(root / "exports" / "v0001" / "items.parquet").height
    for mdir in (root / "merchants").iterdir():
        bias = np.load(mdir / "v0001" / "item_bias.npy")
        assert bias.shape == (n_items,) and np.abs(bias).max() > 0
        served = json.loads((mdir / "v0001" / "served_weight.json").read_text())  # chosen on its validation slice
        assert f"{served['popularity_weight']:g}" in served["validation"]
    assert not list((root / "exports").rglob("item_bias*")) and not list((root / "exports").rglob("served_weight*"))
    card = json.loads((root / "exports" / "v0001" / "model_card.json").read_text())
    assert 0 <= card["metrics"]["test_served"]["recall@20"] <= 1  # the API's default ranking, beside w = 1's
    assert "at the served popularity weights" in result.output


def test_evaluate_foldin_measures_every_rule_against_learned_vectors(tmp_path, tiny_csv):
    result = runner.invoke(app, ["evaluate-foldin", *tiny_args(tmp_path, tiny_csv), "--users", "15"])
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "results").glob("foldin-*.json")
    res = json.loads(path.read_text())
    assert {"learned", "mean", "softmax reg=1", "ridge reg=3"} <= set(res["rules"])
    for name, rule in res["rules"].items():
        assert 0 <= rule["recall@20"] <= 1 and rule["users"] > 0, name
    assert res["best"] != "learned" and res["best"] in res["rules"]
    # fold-in from a customer's own history is a real ranking, far above chance (20 of ~190 items)
    assert res["rules"][res["best"]]["recall@20"] > 0.15


def test_evaluate_foldin_of_an_ials_model_measures_the_fold_in_the_api_serves(tmp_path, tiny_csv):
    ials = ["--set", "local.loss=ials", "--set", "local.temperature=1", "--set", "local.user_solve_reg=3"]
    # the tower's own fold-in rules, without the file default's co-purchase term: its block, the same
    # w x for every rule, dominates on this tiny shop at the grid's larger weights and levels the rules
    ials += ["--set", "model.copurchase_weights=[]"]
    result = runner.invoke(app, ["evaluate-foldin", *tiny_args(tmp_path, tiny_csv), *ials, "--users", "15"])
    assert result.exit_code == 0, result.output
    (path,) = (tmp_path / "results").glob("foldin-*.json")
    rules = json.loads(path.read_text())["rules"]
    assert {"learned", "mean", "ials reg=1", "ials reg=3", "ridge reg=3"} <= set(rules)
    assert not any(name.startswith("softmax") for name in rules)  # the API never folds an ials model in by softmax
    # the learned vectors are ALS's user step at user_solve_reg 3 from train alone; folding in train + validation
    # at the same reg ranks as well (0.259 against 0.244 here), far above another rule (ridge 0.09, mean 0.14)
    assert abs(rules["ials reg=3"]["recall@20"] - rules["learned"]["recall@20"]) < 0.03
    assert rules["ials reg=3"]["recall@20"] > max(rules["mean"]["recall@20"], rules["ridge reg=3"]["recall@20"]) + 0.05


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--port", "99999"], "99999 is not in the range 1<=x<=65535"),
        (["--foldin-reg", "nan"], "fold-in regularisation must be a finite number >= 0, got nan"),
        (["--foldin-reg", "-1"], "fold-in regularisation must be a finite number >= 0"),
        (["--watch-interval", "inf"], "watch interval must be a finite number >= 0 seconds, got inf"),
        (["--log-level", "loud"], "--log-level 'loud': choose one of critical, error, warning, info, debug, trace"),
    ],
)
def test_serve_refuses_bad_options_before_it_starts(tmp_path, flags, message):
    """Each of these once started a server (NaN, inf, a port past 65535) or ended in uvicorn's traceback."""
    result = CliRunner().invoke(app, ["serve", "--export", str(tmp_path), *flags])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_generate_shop_refuses_paths_it_cannot_write_as_one_line(tmp_path):
    """Each of these once ended in a traceback (a folder, a file as parent) or wrote CSV into a file
    that --dataset file then refused (.json)."""
    (tmp_path / "taken.csv").mkdir()
    (tmp_path / "afile").write_text("x")
    for out, message in (
        (tmp_path / "taken.csv", "taken.csv: is a folder"),
        (tmp_path / "afile" / "shop.csv", "shop.csv: cannot write"),
        (tmp_path / "shop.json", "shop.json: the generated shop is written as CSV"),
        (tmp_path / "seed.csv", "--seed"),  # a negative seed once ended in numpy's ValueError
    ):
        extra = ["--seed", "-1"] if out.name == "seed.csv" else []
        result = CliRunner().invoke(app, ["generate-shop", str(out), *extra])
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output


def test_a_weight_chosen_at_the_top_of_its_grid_is_pointed_out():
    from fedrec.training.train import at_the_top

    scores = {0.0: 0.30, 1.0: 0.31, 3.0: 0.32}
    assert "the largest candidate" in at_the_top(3.0, scores, "model.content_match_weights")
    assert "model.content_match_weights" in at_the_top(3.0, scores, "model.content_match_weights")
    assert at_the_top(1.0, scores, "x") == ""  # inside the grid
    assert at_the_top(2.0, {2.0: 0.3}, "x") == ""  # a fixed weight is no choice
    assert at_the_top(0.0, {0.0: 0.3, 0.0001: 0.2}, "x") == ""
