"""`tests/run.sh`, what `make test` runs: two pytest processes whose statuses make one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

RUN = Path(__file__).with_name("run.sh")
# Stands in for the venv's python: says which of the two runs it is, exits with that run's status.
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$*" == *"-m network and not slow"* ]]; then echo "networked run: $*"; exit "$NET"; fi
echo "other run: $*"; exit "$REST"
"""


@pytest.mark.parametrize(
    "rest, net, status",
    [(0, 0, 0), (1, 0, 1), (0, 1, 1), (2, 1, 2), (5, 0, 0), (0, 5, 0), (5, 5, 5)],
)
def test_make_test_fails_when_either_run_fails(tmp_path: Path, rest: int, net: int, status: int) -> None:
    """Either run's failure fails `make test`; "no tests collected" (5) alone does not."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {**os.environ, "REST": str(rest), "NET": str(net), "TMPDIR": str(tmp_path)}
    out = subprocess.run(["bash", str(RUN), str(fake)], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == status, out.stdout + out.stderr
    # each run selected its own tests, and the networked run's output is printed after the other's
    assert "other run: -m pytest -q -m not network and not slow" in out.stdout
    assert out.stdout.index("other run") < out.stdout.index("networked run: -m pytest -q -p no:cacheprovider")
    assert list(tmp_path.glob("fedrec-network-tests.*")) == []  # its log is removed
