"""`fedrec federation ...`: the networked runtime's three roles, as thin wrappers over Flower's commands.

  operator:  credentials (demo CA, TLS certificate, node keys), coordinator (flower-superlink with
             TLS and node authentication on), register (flwr supernode register), run (flwr run)
  merchant:  node (checks its data bundle, then flower-supernode with its own key and directories)
  anyone:    prepare (split a dataset into one bundle per merchant, for demos and tests)
Each wrapper only builds the Flower command line; `--dry-run` prints it instead of running it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from fedrec.errors import ConfigError, FedrecError
from fedrec.training.friendly import friendly

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The networked runtime on Flower (issue 12).")
APP_DIR = Path(__file__).resolve().parent / "flower_app"
CONNECTION = "fedrec"


def flower_bin(name: str) -> str:
    """Flower's commands from this interpreter's environment (never a same-named one on PATH)."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise FedrecError(f"{name}: not found; install fedrec (it depends on flwr) in this environment")
    return found


def flower_env() -> dict[str, str]:
    """Flower starts helper processes by name (flower-superexec, flwr-clientapp): put ours first."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # SuperExec polls for work every 1 s by default; each SecAgg+ round is 4 messages per node.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    return env


def coordinator_command(certs: Path, host: str, port: int, database: Path, auth: bool = True) -> list[str]:
    cmd = [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"),
        "--host", host, "--port", str(port),
        "--database", str(database),
        "--disable-runtime-dependency-installation",  # fedrec is installed; nothing is downloaded
    ]  # fmt: skip
    if auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def node_command(
    bundle: Path, state_dir: Path, artifacts: Path, superlink: str, ca: Path, key: Path, port: int
) -> list[str]:
    node_config = " ".join(
        f"{k}={json.dumps(str(v.resolve()))}"
        for k, v in (("bundle", bundle), ("state-dir", state_dir), ("artifacts-dir", artifacts))
    )
    return [
        flower_bin("flower-supernode"),
        "--root-certificates", str(ca),
        "--superlink", superlink,
        "--auth-supernode-private-key", str(key),
        "--auth-supernode-public-key", str(key.with_name(key.name + ".pub")),
        "--node-config", node_config,
        "--port", str(port),
    ]  # fmt: skip


def write_flwr_config(home: Path, superlink: str, ca: Path) -> None:
    """The `flwr` CLI's connection to our coordinator, in a FLWR_HOME of fedrec's own."""
    home.mkdir(parents=True, exist_ok=True)
    text = (
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{superlink}"\nroot-certificates = {json.dumps(str(ca.resolve()))}\n'
    )
    (home / "config.toml").write_text(text, encoding="utf-8")


def run_command(run_config: dict[str, str], path: Path) -> list[str]:
    """`flwr run` with the run config in a TOML file (JSON strings are valid TOML basic strings)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in run_config.items()), encoding="utf-8")
    return [flower_bin("flwr"), "run", str(APP_DIR), CONNECTION, "--stream", "--run-config", str(path)]


def _launch(cmd: list[str], dry_run: bool, env: dict[str, str] | None = None) -> None:
    if dry_run:
        typer.echo(shlex.join(cmd))
        return
    os.execve(cmd[0], cmd, env or flower_env())  # the wrapper's PID becomes Flower's


Dry = Annotated[bool, typer.Option("--dry-run", help="Print the Flower command instead of running it.")]
CaOpt = Annotated[Path, typer.Option(help="The CA certificate the coordinator's TLS chains to.")]


@app.command()
@friendly
def prepare(
    out: Annotated[Path, typer.Option(help="Directory for one bundle per merchant.")],
    dataset: Annotated[str, typer.Option("--dataset", "-d")] = "synthetic",
    config: Annotated[Path | None, typer.Option("--config", "-c")] = None,
) -> None:
    """Split a dataset into per-merchant bundles (a merchant's own data, plus the shared catalogue)."""
    from fedrec.config import load_config
    from fedrec.federated.merchant_node import write_bundles
    from fedrec.training.cli import default_config_path
    from fedrec.training.data import load_dataset

    cfg = load_config(config or default_config_path(dataset), {"data.dataset": dataset})
    ds = load_dataset(cfg.data, cfg.federation.seed)
    for path in write_bundles(ds, out):
        typer.echo(str(path))


@app.command()
@friendly
def credentials(
    out: Annotated[Path, typer.Option(help="Directory for ca.crt, server.pem/key and keys/<node>[.pub].")],
    nodes: Annotated[str, typer.Option(help="Comma-separated node names to make key pairs for.")] = "",
    hosts: Annotated[
        str, typer.Option(help="Names the coordinator's certificate is valid for.")
    ] = "localhost,127.0.0.1",
) -> None:
    """Demo credentials: a CA, the coordinator's TLS certificate, and one key pair per node."""
    from fedrec.federated.credentials import check_node_name, make_node_key, make_tls

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; give a folder for the credentials")
    names = [check_node_name(n.strip()) for n in nodes.split(",") if n.strip()]  # all, before anything is written
    make_tls(out, tuple(h for h in hosts.split(",") if h))
    for name in names:
        make_node_key(out / "keys", name)
    typer.echo(f"credentials in {out}")


@app.command()
@friendly
def coordinator(
    certs: Annotated[Path, typer.Option(help="Directory with ca.crt, server.pem, server.key.")],
    state: Annotated[Path, typer.Option(help="The coordinator's Flower state (a SQLite file).")],
    host: str = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port the nodes connect to.")] = 9092,
    dry_run: Dry = False,
) -> None:
    """Start the coordinator (flower-superlink): TLS on, only registered nodes may join."""
    state.parent.mkdir(parents=True, exist_ok=True)
    _launch(coordinator_command(certs, host, port, state), dry_run)


@app.command()
@friendly
def register(
    public_key: Annotated[Path, typer.Argument(help="A merchant node's public key (.pub).")],
    superlink: str = "127.0.0.1:9092",
    ca: CaOpt = Path("ca.crt"),
    home: Annotated[Path, typer.Option(help="FLWR_HOME for the flwr CLI's connection.")] = Path(".flwr"),
) -> None:
    """Register a merchant node's public key with the coordinator (flwr supernode register)."""
    write_flwr_config(home, superlink, ca)
    env = {**flower_env(), "FLWR_HOME": str(home.resolve())}
    proc = subprocess.run([flower_bin("flwr"), "supernode", "register", str(public_key), CONNECTION], env=env)
    raise typer.Exit(proc.returncode)


@app.command()
@friendly
def node(
    bundle: Annotated[Path, typer.Option(help="This merchant's data bundle (fedrec federation prepare).")],
    state_dir: Annotated[Path, typer.Option(help="Where this merchant's private state lives between rounds.")],
    artifacts: Annotated[Path, typer.Option(help="Where this merchant writes its half of each export.")],
    key: Annotated[Path, typer.Option(help="This node's private key; KEY.pub beside it.")],
    ca: CaOpt,
    superlink: str = "127.0.0.1:9092",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Local port for this node's ClientApp API.")] = 9094,
    dry_run: Dry = False,
) -> None:
    """Start a merchant's node (flower-supernode), after checking that its data bundle loads."""
    from fedrec.federated.merchant_node import load_bundle

    b = load_bundle(bundle)  # a bad file fails here, with the loader's message, before joining
    typer.echo(f"merchant {b.merchant.name}: {b.merchant.n_users} customers, {b.items.height} catalogue items")
    state_dir.mkdir(parents=True, exist_ok=True)
    _launch(node_command(bundle, state_dir, artifacts, superlink, ca, key, port), dry_run)


@app.command()
@friendly
def run(
    workdir: Annotated[Path, typer.Option(help="The coordinator's run directory: checkpoint.pt, exports/.")],
    catalogue: Annotated[Path, typer.Option(help="The shared catalogue (catalogue.parquet of any bundle).")],
    ca: CaOpt,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="Run config (TOML/YAML).")] = None,
    dataset: Annotated[
        str, typer.Option("--dataset", "-d", help="Picks the shipped config when -c is not given.")
    ] = "synthetic",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a setting, KEY=VALUE.")] = None,
    superlink: str = "127.0.0.1:9092",
    record_dir: Annotated[
        Path | None, typer.Option(help="Audit: keep every reply the coordinator receives (leakage tests).")
    ] = None,
    dry_run: Dry = False,
) -> None:
    """Launch a training run on the federation (flwr run); resumes from workdir/checkpoint.pt."""
    from fedrec.config import check_networked, load_config, parse_sets
    from fedrec.training.cli import default_config_path

    overrides = parse_sets(set_)
    config = config or default_config_path(dataset)
    check_networked(load_config(config, overrides))  # a bad config fails here, not inside the ServerApp
    home = workdir.resolve() / "flwr-home"
    write_flwr_config(home, superlink, ca)
    rc = {
        "fedrec-config": str(config.resolve()) if config else "",
        "overrides": json.dumps(overrides),
        "workdir": str(workdir.resolve()),
        "catalogue": str(catalogue.resolve()),
        "record-dir": str(record_dir.resolve()) if record_dir else "",
    }
    _launch(run_command(rc, workdir.resolve() / "run-config.toml"), dry_run, {**flower_env(), "FLWR_HOME": str(home)})
