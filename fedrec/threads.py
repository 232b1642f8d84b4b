"""How many threads one process computes with: torch's intra-op pool and the BLAS pool together.

numpy and scipy (the user solve, the fold-in, the baselines) multiply matrices through OpenBLAS,
whose pool ignores `torch.set_num_threads` and starts one thread per core. With merchants trained
on threads (`federation.workers`) or several merchant processes per machine, each BLAS call then
runs on every core at once and they contend: at 100 merchants and 2 workers on 2 cores, that made
an in-process round 1.7x slower. Setting both pools from the one `threads` setting avoids it.
"""

from __future__ import annotations

import numpy as np  # noqa: F401  (loads numpy's BLAS, so the limit below reaches it)
import torch
from threadpoolctl import threadpool_info, threadpool_limits


def use_threads(n: int) -> None:
    """Limit torch to `n` threads and every loaded BLAS pool to at most `n`, for the rest of the
    process. A pool already smaller (OPENBLAS_NUM_THREADS=1, as the make targets set) is kept."""
    torch.set_num_threads(n)
    blas = {p["filepath"]: min(n, p["num_threads"]) for p in threadpool_info() if p["user_api"] == "blas"}
    if blas:
        threadpool_limits(blas)
