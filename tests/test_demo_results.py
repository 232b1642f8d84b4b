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
