"""The served export and how it is replaced: load beside the old one, then swap one reference.

Requests read `holder.current` once and keep that object, so a swap never affects a request in
flight and a request never sees two versions. A failed load leaves the old export serving.
"""

from __future__ import annotations

import gc
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from fedrec.errors import FedrecError
from fedrec.serving import metrics
from fedrec.serving.export_store import LoadedExport, latest_version_name, load_export
from fedrec.serving.index import set_search_depth
from fedrec.serving.settings import ServeSettings

log = logging.getLogger("fedrec.serving")


@dataclass(frozen=True)
class ReloadOutcome:
    previous: str | None
    current: str | None
    changed: bool
    error: str | None = None


class ExportHolder:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.current: LoadedExport | None = None
        self.last_error: str | None = None
        self._lock = threading.Lock()  # one load at a time; readers never take it

    def _load(self) -> LoadedExport:
        s = self.settings
        export = load_export(s.export_path, s.merchant, Path(s.merchant_dir) if s.merchant_dir else None)
        own = export.merchant.index if export.merchant is not None else None  # the [v, b] index
        for index in (export.index, export.cosine_index, own):
            if index is not None:
                set_search_depth(index, nprobe=s.nprobe, ef_search=s.ef_search)
        return export

    def reload(self, only_if_changed: bool = True) -> ReloadOutcome:
        """Load the version LATEST names (or the fixed version directory) and swap it in."""
        with self._lock:
            previous = self.current.version if self.current else None
            try:
                if (
                    only_if_changed
                    and previous is not None
                    and latest_version_name(self.settings.export_path) == previous
                ):
                    return ReloadOutcome(previous, previous, False)
                fresh = self._load()
            except FedrecError as exc:
                self.last_error = str(exc)
                metrics.RELOADS.labels("failed").inc()
                log.error("export not loaded, still serving %s: %s", previous, exc)
                return ReloadOutcome(previous, previous, False, str(exc))
            self.current = fresh  # the atomic swap
            self.last_error = None
            freeze_long_lived()
            metrics.RELOADS.labels("loaded").inc()
            metrics.set_export(fresh.version, fresh.n_items)
            log.info("serving export %s (%d items, %s index)", fresh.version, fresh.n_items, fresh.kind)
            return ReloadOutcome(previous, fresh.version, fresh.version != previous)


def freeze_long_lived() -> None:
    """Puts everything alive now (the export: a million item ids and their records on a 1M
    catalogue) out of the cyclic garbage collector's reach; refcounting still frees it.

    Why: every full collection walked those objects, 110 ms with a 1M-item export loaded
    (measured), and under load a full collection comes every few seconds: it showed as p99 spikes
    of 50 to 170 ms (README bench-serve). Unfreezing first lets one full collection, at the
    reload, reclaim cycles left by the export it replaced.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
