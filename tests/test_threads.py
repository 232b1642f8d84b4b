"""`use_threads` limits torch and the BLAS pool numpy uses together (a child process: the limit is
process-wide and would leak into other tests)."""

import json
import subprocess
import sys

CHILD = """
import json, numpy, torch
from threadpoolctl import threadpool_info
from fedrec.threads import use_threads
use_threads(1)
blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
print(json.dumps({"torch": torch.get_num_threads(), "blas": blas}))
"""


def test_use_threads_limits_torch_and_blas_together():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, env={
        "PATH": "/usr/bin:/bin", "OPENBLAS_NUM_THREADS": "2", "OMP_NUM_THREADS": "2",
    })  # fmt: skip
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["torch"] == 1
    assert got["blas"] and all(n == 1 for n in got["blas"])  # numpy's OpenBLAS is loaded: it was 2
