"""Serving settings: one small dataclass, passed to worker processes as JSON in the environment."""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from fedrec.errors import ConfigError
from fedrec.serving.foldin import FOLDIN_METHODS, FoldInConfig

ENV_VAR = "FEDREC_SERVE_SETTINGS"
TOKEN_ENV_VAR = "FEDREC_ADMIN_TOKEN"


@dataclass(frozen=True)
class ServeSettings:
    export: str  # an exports root (with LATEST, watched for new versions) or one version directory
    merchant: str | None = None  # whose customers this service knows; None: item-only endpoints
    merchant_dir: str | None = None  # default: <exports root>/../merchants/<merchant>
    watch_interval: float = 2.0  # seconds between checks of LATEST; 0 turns the watcher off
    admin_token: str | None = None  # enables POST /v1/admin/reload (Bearer token)
    foldin_method: str = "softmax"
    # measured (make evaluate-foldin, results/foldin-*.json): best at 0.3 on the synthetic shop and
    # 10 on MovieLens; 1.0 is within 0.013 recall@20 of the best on both
    foldin_reg: float = 1.0
    foldin_full_items: int = 5_000  # softmax over the whole catalogue up to this size, else over ...
    foldin_candidates: int = 1_000  # ... the items nearest to the basket ...
    foldin_sample: int = 1_000  # ... plus a uniform sample standing in for the rest (serving/foldin.py)
    ef_search: int | None = None  # HNSW search depth; None keeps the export's
    nprobe: int | None = None  # IVF or ivfpq lists scanned per query; None keeps the export's
    foldin_batch: int = 32  # most baskets one micro-batch solves together (serving/batcher.py)
    threads: int = 1  # BLAS/OpenMP threads per worker process
    max_body_bytes: int = 1_000_000  # larger request bodies get a 413 before they are parsed
    max_path_bytes: int = 2048  # longer paths get a 414
    max_query_bytes: int = 2048  # longer query strings get a 414

    def __post_init__(self) -> None:
        if self.foldin_method not in FOLDIN_METHODS:
            raise ConfigError(f"fold-in method {self.foldin_method!r}: choose one of {', '.join(FOLDIN_METHODS)}")
        if not 0 <= self.watch_interval < math.inf:  # NaN fails every comparison, so it is refused too
            raise ConfigError(f"watch interval must be a finite number >= 0 seconds, got {self.watch_interval}")
        if not 0 <= self.foldin_reg < math.inf:
            raise ConfigError(f"fold-in regularisation must be a finite number >= 0, got {self.foldin_reg}")
        for name in (
            "foldin_full_items",
            "foldin_candidates",
            "foldin_sample",
            "foldin_batch",
            "threads",
            "max_body_bytes",
            "max_path_bytes",
            "max_query_bytes",
            "ef_search",  # these two may be None (keep the export's)
            "nprobe",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name.replace('_', ' ')} must be >= 1")

    def foldin_config(self) -> FoldInConfig:
        return FoldInConfig(
            self.foldin_method, self.foldin_reg, self.foldin_full_items, self.foldin_candidates, self.foldin_sample
        )

    @property
    def export_path(self) -> Path:
        return Path(self.export)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> ServeSettings:
        raw = os.environ.get(ENV_VAR)
        if not raw:
            raise ConfigError(f"{ENV_VAR} is not set: start the server with `fedrec serve`")
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        settings = cls(**{k: v for k, v in data.items() if k in known})
        if settings.admin_token is None and os.environ.get(TOKEN_ENV_VAR):
            settings = cls(**{**asdict(settings), "admin_token": os.environ[TOKEN_ENV_VAR]})
        return settings
