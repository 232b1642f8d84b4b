"""How many threads one process computes with: torch's intra-op pool and the BLAS pool together.

numpy and scipy (the user solve, the fold-in, the baselines) multiply matrices through OpenBLAS,
whose pool ignores `torch.set_num_threads` and starts one thread per core. With merchants trained
on threads (`federation.workers`) or several merchant processes per machine, each BLAS call then
runs on every core at once and they contend: at 100 merchants and 2 workers on 2 cores, that made
an in-process round 1.7x slower. Setting both pools from the one `threads` setting avoids it.
"""

from __future__ import annotations

import torch
from threadpoolctl import threadpool_limits


def use_threads(n: int) -> None:
    """Limit torch and BLAS to `n` threads each, for the rest of the process."""
    torch.set_num_threads(n)
    threadpool_limits(n, user_api="blas")
