"""Known-customer searches batched on the event loop (serving/search_batcher.py)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import fedrec.serving.search_batcher as batcher_module
from fedrec.serving.export_store import load_export
from fedrec.serving.recommend import customer_vector, purchased_rows, search
from fedrec.serving.search_batcher import SearchBatcher


@pytest.fixture(scope="module")
def export(served_root):
    return load_export(served_root / "exports", "big")


def test_concurrent_searches_are_one_faiss_call_with_each_answer_as_if_alone(export, monkeypatch) -> None:
    """Different k, exclusions and popularity weights in one batch: each request gets exactly what
    `recommend.search` gives it alone (a flat index), and the batch was one `search_many` call."""
    calls: list[int] = []
    real = batcher_module.search_many

    def counting(export, queries, ks, excludes, weights):
        calls.append(len(queries))
        return real(export, queries, ks, excludes, weights)

    monkeypatch.setattr(batcher_module, "search_many", counting)
    users = range(min(12, len(export.merchant.user_ids)))
    asks = [
        (customer_vector(export, u), 3 + u % 5, purchased_rows(export, u) if u % 2 else None, (u % 3) / 2)
        for u in users
    ]

    async def scenario():
        b = SearchBatcher()
        return await asyncio.gather(*(b.search(export, q, k, ex, w) for q, k, ex, w in asks))

    answers = asyncio.run(scenario())
    assert calls == [len(asks)]
    for (rows, scores), (q, k, ex, w) in zip(answers, asks, strict=True):
        alone_rows, alone_scores = search(export, q, k, ex, w)
        assert len(rows) == k
        np.testing.assert_array_equal(rows, alone_rows)
        np.testing.assert_allclose(scores, alone_scores, rtol=1e-5)
        if ex is not None:
            assert not np.isin(rows, ex).any()


def test_a_batch_never_mixes_exports_and_respects_max_batch(monkeypatch) -> None:
    calls: list[tuple[object, int]] = []

    def fake(export, queries, ks, excludes, weights):
        calls.append((export, len(queries)))
        return [(np.array([int(q[0])]), np.array([w])) for q, w in zip(queries, weights, strict=True)]

    monkeypatch.setattr(batcher_module, "search_many", fake)
    a, b = object(), object()
    exports = [a if i % 3 else b for i in range(11)]

    async def scenario():
        s = SearchBatcher(max_batch=3)
        return await asyncio.gather(*(s.search(e, np.array([float(i)]), 1, None, 0.5) for i, e in enumerate(exports)))

    answers = asyncio.run(scenario())
    assert [int(rows[0]) for rows, _ in answers] == list(range(11))
    assert sum(n for _, n in calls) == 11 and max(n for _, n in calls) == 3
    assert sorted(n for e, n in calls if e is a) == [1, 3, 3] and sorted(n for e, n in calls if e is b) == [1, 3]


def test_an_error_reaches_every_request_of_its_batch_and_the_next_batch_is_answered(monkeypatch) -> None:
    def fake(export, queries, ks, excludes, weights):
        if export == "broken":
            raise ValueError("index file damaged")
        return [(np.array([1]), np.array([1.0])) for _ in queries]

    monkeypatch.setattr(batcher_module, "search_many", fake)

    async def scenario():
        s = SearchBatcher()
        failed = await asyncio.gather(
            *(s.search("broken", np.zeros(2), 1, None, 1.0) for _ in range(3)), return_exceptions=True
        )
        fine = await s.search("good", np.zeros(2), 1, None, 1.0)
        return failed, fine

    failed, fine = asyncio.run(scenario())
    assert all(isinstance(e, ValueError) and "damaged" in str(e) for e in failed) and len(failed) == 3
    assert fine[0].tolist() == [1]
