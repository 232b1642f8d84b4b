"""Data sources (synthetic shop log, MovieLens-100K, a merchant's own file) and the split protocol.

Installed as `fedrec.datasets`.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV_VAR = "FEDREC_CACHE_DIR"


def cache_dir() -> Path:
    """Where generated and downloaded data live: $FEDREC_CACHE_DIR, else ~/.cache/fedrec.

    Never inside the installed package, which may be read-only (site-packages, a container image).
    """
    configured = os.environ.get(CACHE_ENV_VAR)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedrec"
