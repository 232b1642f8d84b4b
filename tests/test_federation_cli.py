"""`fedrec federation ...`: the wrappers build Flower's command lines and fail cleanly on bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from fedrec.config import load_config
from fedrec.errors import FedrecError
from fedrec.training.cli import app
from fedrec.training.flower_server import Checkpoint, config_hash, load_checkpoint, save_checkpoint

runner = CliRunner()


def test_coordinator_runs_with_tls_and_node_authentication(tmp_path) -> None:
    res = runner.invoke(
        app, ["federation", "coordinator", "--certs", str(tmp_path), "--state", str(tmp_path / "s.db"), "--dry-run"]
    )
    assert res.exit_code == 0, res.output
    cmd = res.output.split()
    assert cmd[0].endswith("flower-superlink")
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth"):
        assert flag in cmd
    assert "--insecure" not in cmd
    assert "--disable-runtime-dependency-installation" in cmd  # nothing downloads at run time


def test_node_refuses_a_bad_bundle_before_joining(tmp_path) -> None:
    bundle = tmp_path / "shop"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({"format": 1, "merchant": "shop", "index": 0}))
    args = ["federation", "node", "--bundle", str(bundle), "--state-dir", str(tmp_path / "st")]
    args += [
        "--artifacts",
        str(tmp_path / "a"),
        "--key",
        str(tmp_path / "k"),
        "--ca",
        str(tmp_path / "ca"),
        "--dry-run",
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert "train.npz" in res.output and "Traceback" not in res.output
    # a bundle whose merchant name would put the node's export half outside its artifacts folder
    (bundle / "bundle.json").write_text(json.dumps({"format": 1, "merchant": "../../x", "index": 0}))
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and "merchant '../../x' holds a separator" in res.output, res.output


def test_run_refuses_a_bad_setting_before_launching(tmp_path) -> None:
    args = ["federation", "run", "--workdir", str(tmp_path), "--catalogue", str(tmp_path / "c.parquet")]
    args += ["--ca", str(tmp_path / "ca"), "--set", "network.min_merchants=2", "--dry-run"]
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert "min_merchants" in res.output


def test_run_refuses_what_only_the_in_process_runtime_does(tmp_path) -> None:
    """Robust rules read each merchant's own delta and float16 uploads bypass SecAgg+'s quantisation:
    the networked runtime must refuse both before launching, not train something else."""
    base = ["federation", "run", "--workdir", str(tmp_path), "--catalogue", str(tmp_path / "c.parquet")]
    base += ["--ca", str(tmp_path / "ca"), "--dry-run"]
    for setting, named in [
        ("federation.robust=median", "federation.robust"),
        ("federation.upload_precision=float16", "federation.upload_precision"),
    ]:
        res = runner.invoke(app, [*base, "--set", setting])
        assert res.exit_code == 2, (setting, res.output)
        assert named in res.output and "Traceback" not in res.output
    ok = runner.invoke(app, [*base, "--set", "federation.robust=none"])
    assert ok.exit_code == 0, ok.output
    assert "flwr" in ok.output


def test_credentials_refuse_a_file_as_folder_and_node_names_that_leave_it(tmp_path) -> None:
    """Both once ended in a traceback or wrote a key outside keys/ ("../x"); nothing is written."""
    afile = tmp_path / "taken"
    afile.write_text("x")
    res = runner.invoke(app, ["federation", "credentials", "--out", str(afile), "--nodes", "a"])
    assert res.exit_code == 2 and "is a file; give a folder" in res.output and "Traceback" not in res.output
    out = tmp_path / "creds"
    for name in ("../escape", "a/b", ".."):
        res = runner.invoke(app, ["federation", "credentials", "--out", str(out), "--nodes", f"ok,{name}"])
        assert res.exit_code == 2 and f"node name {name!r}" in res.output, res.output
    assert not out.exists() and not (tmp_path / "escape").exists()
    res = runner.invoke(app, ["federation", "credentials", "--out", str(out), "--nodes", "shop-1,Shop 2.eu"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (out / "keys").iterdir()) == ["Shop 2.eu", "Shop 2.eu.pub", "shop-1", "shop-1.pub"]


def test_a_broken_coordinator_checkpoint_is_named_not_unpickled_into_a_traceback(tmp_path) -> None:
    cfg = load_config(None, {})
    path = tmp_path / "checkpoint.pt"
    assert load_checkpoint(path, cfg) is None  # none yet: a fresh run
    path.write_bytes(b"\x80\x04 truncated")
    with pytest.raises(FedrecError, match="checkpoint.pt: cannot read the checkpoint"):
        load_checkpoint(path, cfg)
    torch.save({"config_hash": config_hash(cfg), "run_key": "r", "from_the_future": 1}, path)
    with pytest.raises(FedrecError, match="not this version's coordinator checkpoint"):
        load_checkpoint(path, cfg)
    save_checkpoint(path, Checkpoint(config_hash(cfg), "r", round=3))
    assert load_checkpoint(path, cfg).round == 3
