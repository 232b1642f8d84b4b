"""The demo's `--results` file: the ServerApp's summary plus the command that made it."""

import json

from fedrec.training.federation_demo import save_summary


def test_demo_summary_is_saved_with_its_command(tmp_path):
    summary = {"test": {"recall@20": 0.25}, "rounds": 20, "privacy": {"epsilon_spent": 7.98}}
    out = tmp_path / "results" / "federation-dp.json"
    out.parent.mkdir()
    save_summary(out, summary, "python -m fedrec.training.federation_demo --rounds 20")
    got = json.loads(out.read_text())
    assert got["command"] == "python -m fedrec.training.federation_demo --rounds 20"
    assert got["test"] == {"recall@20": 0.25} and got["privacy"]["epsilon_spent"] == 7.98
    assert len(got["date"]) == 10
    assert [p.name for p in out.parent.iterdir()] == ["federation-dp.json"]  # no temporary file left


def test_an_unwritable_results_path_is_one_error_line(tmp_path, monkeypatch, capsys):
    from fedrec.training import federation_demo

    summary = {"test": {"recall@20": 0.25}, "best_round": 2, "rounds": 2, "seconds_training": 1.0, "version": "v0001"}
    monkeypatch.setattr(federation_demo, "run_demo", lambda *a, **k: dict(summary))
    monkeypatch.setattr(federation_demo, "stop_on_sigterm", lambda: None)
    (tmp_path / "a-file").write_text("not a directory")
    missing = tmp_path / "a-file" / "run.json"
    assert federation_demo.main(["--workdir", str(tmp_path / "w"), "--results", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write --results") and str(missing) in err and "Traceback" not in err
    assert (tmp_path / "a-file").read_text() == "not a directory"
    written = tmp_path / "run.json"
    assert federation_demo.main(["--workdir", str(tmp_path / "w"), "--results", str(written)]) == 0
    assert json.loads(written.read_text())["command"].endswith(f"--results {written}")
