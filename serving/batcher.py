"""Micro-batching of anonymous-basket requests: concurrent fold-ins are solved together.

Why: a softmax fold-in is a few Newton steps over the catalogue. Solved one request at a time on
a thread pool, 16 concurrent baskets meant 16 threads (each with BLAS threads of its own)
fighting over 2 cores, and the endpoint collapsed to a few requests a second. Here each worker
process has one solver thread. Requests queue up while it works, and it takes everything waiting
(up to `max_batch`) as one batch: a batched Newton solve (matrix-matrix products) and one batched
FAISS search. Under light load a batch is a single request, so nothing waits for a timer.

The batch is grouped by the `LoadedExport` each request picked up, so a hot reload in the middle
never mixes versions.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from fedrec.serving.export_store import LoadedExport
from fedrec.serving.foldin import FoldInConfig
from fedrec.serving.recommend import basket_vectors, search_many


@dataclass(frozen=True)
class BasketQuery:
    """One anonymous basket: catalogue rows, how many results, whether to leave the basket out, and
    the weight of the merchant's popularity term in the ranking."""

    rows: np.ndarray
    k: int
    exclude_items: bool
    popularity_weight: float = 1.0  # of the merchant item bias in the ranking (recommend.served_index)


def answer_baskets(
    export: LoadedExport, queries: list[BasketQuery], settings: FoldInConfig
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Fold in every basket, then one batched search (runs on the solver thread)."""
    vectors = basket_vectors(export, [q.rows for q in queries], settings)
    excludes = [np.unique(q.rows) if q.exclude_items else None for q in queries]
    weights = np.array([q.popularity_weight for q in queries], dtype=np.float32)
    return search_many(export, vectors, [q.k for q in queries], excludes, weights)


class FoldInBatcher:
    def __init__(self, settings: FoldInConfig, max_batch: int = 32) -> None:
        self.settings = settings
        self.max_batch = max_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedrec-foldin")
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, export: LoadedExport, query: BasketQuery) -> tuple[np.ndarray, np.ndarray]:
        if self._queue is None:  # not started (e.g. a test app without lifespan): solve inline
            return answer_baskets(export, [query], self.settings)[0]
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((export, query, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            pending = [item for item in batch if not item[2].cancelled()]  # clients that left
            by_export: dict[int, list] = {}
            for item in pending:
                by_export.setdefault(id(item[0]), []).append(item)
            for items in by_export.values():
                export = items[0][0]
                try:
                    answers = await loop.run_in_executor(
                        self._executor, answer_baskets, export, [q for _, q, _ in items], self.settings
                    )
                except Exception as exc:  # hand the error to each request; the loop must go on
                    for _, _, future in items:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, _, future), answer in zip(items, answers, strict=True):
                    if not future.done():
                        future.set_result(answer)
