"""`use_threads` limits torch and the BLAS pool numpy uses together (a child process: the limit is
process-wide and would leak into other tests)."""

import json
import subprocess
import sys

CHILD = """
import json, sys, numpy, torch
from threadpoolctl import threadpool_info
from fedrec.threads import use_threads
use_threads(int(sys.argv[1]))
blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
print(json.dumps({"torch": torch.get_num_threads(), "blas": blas}))
"""


def threads_after(n: int, openblas: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, check=True, env={
        "PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": openblas, "OMP_NUM_THREADS": openblas,
    })  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_use_threads_limits_torch_and_blas_together():
    got = threads_after(1, "2")
    assert got["torch"] == 1
    assert got["blas"] and all(n == 1 for n in got["blas"])  # numpy's OpenBLAS is loaded: it was 2


def test_use_threads_never_raises_a_smaller_blas_pool():
    got = threads_after(2, "1")  # the make targets set OPENBLAS_NUM_THREADS=1
    assert got["torch"] == 2
    assert got["blas"] and all(n == 1 for n in got["blas"])
