"""Fold-in math: each rule solves the problem it claims to solve."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedrec.serving.foldin import fold_in


@pytest.fixture
def vectors():
    return np.random.default_rng(0).normal(size=(300, 8)).astype(np.float32)


def test_mean_is_the_basket_mean(vectors):
    np.testing.assert_allclose(fold_in(vectors, [3, 7, 7], "mean"), vectors[[3, 7, 7]].mean(0), rtol=1e-6)


def test_ridge_matches_the_normal_equations(vectors):
    rows = [1, 2, 3, 4]
    a = vectors[rows].astype(np.float64)
    expected = np.linalg.solve(a.T @ a + 0.5 * np.eye(8), a.T @ np.ones(4))
    np.testing.assert_allclose(fold_in(vectors, rows, "ridge", reg=0.5), expected, rtol=1e-5)


def test_softmax_fold_in_is_the_map_optimum(vectors):
    """At the optimum the gradient of the MAP objective vanishes (checked with autograd)."""
    rows = np.array([5, 9, 12])
    u = torch.tensor(
        fold_in(vectors, rows, "softmax", reg=0.7, temperature=0.5), dtype=torch.float64, requires_grad=True
    )
    v = torch.tensor(vectors, dtype=torch.float64) / 0.5
    objective = -torch.log_softmax(v @ u, 0)[torch.from_numpy(rows)].sum() + 0.7 * (u @ u)
    objective.backward()
    assert u.grad.abs().max().item() < 1e-3
    scores = vectors @ u.detach().numpy()
    assert (scores[rows] > np.median(scores)).all()  # the basket itself scores above most items


def test_softmax_fold_in_with_a_merchant_bias_is_the_map_optimum_of_the_biased_scores(vectors):
    rows = np.array([5, 9, 12])
    bias = np.random.default_rng(1).normal(scale=2.0, size=300).astype(np.float32)
    u = torch.tensor(
        fold_in(vectors, rows, "softmax", reg=0.7, temperature=0.5, item_bias=bias),
        dtype=torch.float64,
        requires_grad=True,
    )
    v = torch.tensor(vectors, dtype=torch.float64)
    b = torch.tensor(bias, dtype=torch.float64)
    objective = -torch.log_softmax((v @ u + b) / 0.5, 0)[torch.from_numpy(rows)].sum() + 0.7 * (u @ u)
    objective.backward()
    assert u.grad.abs().max().item() < 1e-3
    # the bias changes the answer: it explains part of the basket, so u differs from the unbiased one
    assert not np.allclose(u.detach().numpy(), fold_in(vectors, rows, "softmax", reg=0.7, temperature=0.5), atol=1e-3)


def test_softmax_over_candidates_uses_only_them(vectors):
    rows = np.array([5, 9])
    full = fold_in(vectors, rows, "softmax", reg=1.0)
    everything = fold_in(vectors, rows, "softmax", reg=1.0, candidates=np.arange(300))
    np.testing.assert_allclose(full, everything, rtol=1e-4, atol=1e-5)
    few = fold_in(vectors, rows, "softmax", reg=1.0, candidates=np.arange(20, 40))
    assert not np.allclose(full, few)


def test_bad_arguments(vectors):
    with pytest.raises(ValueError, match="at least one item"):
        fold_in(vectors, [], "mean")
    with pytest.raises(ValueError, match="unknown fold-in method"):
        fold_in(vectors, [1], "magic")


def test_a_batch_of_baskets_solves_each_basket_as_if_alone(vectors):
    from fedrec.serving.foldin import EXACT_TOL, fold_in_many

    baskets = [np.array([5, 9, 12]), np.array([1]), np.array([7, 7, 40, 41, 42])]
    bias = np.random.default_rng(2).normal(size=300).astype(np.float32)
    batch = fold_in_many(vectors, baskets, "softmax", 0.7, 0.5, item_bias=bias, tol=EXACT_TOL, hessian_items=None)
    for rows, u in zip(baskets, batch, strict=True):
        np.testing.assert_allclose(u, fold_in(vectors, rows, "softmax", 0.7, 0.5, item_bias=bias), atol=1e-5)
    # the serving solve (truncated Hessian, looser stop) lands on the same optimum
    fast = fold_in_many(vectors, baskets, "softmax", 0.7, 0.5, item_bias=bias, hessian_items=20)
    np.testing.assert_allclose(fast, batch, atol=1e-2)  # stops at a 1e-6 relative decrease: close, not equal
    # candidate pools are shared by the batch, positives still map to each basket's own rows
    pooled = fold_in_many(vectors, baskets, "softmax", 0.7, 0.5, candidates=np.arange(300), tol=EXACT_TOL,
                          hessian_items=None)  # fmt: skip
    plain = fold_in_many(vectors, baskets, "softmax", 0.7, 0.5, tol=EXACT_TOL, hessian_items=None)
    np.testing.assert_allclose(pooled, plain, atol=1e-5)


def test_the_batcher_groups_waiting_requests_and_routes_each_answer_back(monkeypatch):
    """While one batch is solved, the next requests queue; they are taken together as one batch."""
    import asyncio
    import threading

    import fedrec.serving.batcher as batcher_module
    from fedrec.serving.batcher import BasketQuery, FoldInBatcher
    from fedrec.serving.foldin import FoldInConfig

    sizes: list[int] = []
    calls: list[tuple[object, list[int]]] = []
    first = threading.Event()

    def fake_answer(export, queries, settings):
        sizes.append(len(queries))
        calls.append((export, [int(q.rows[0]) for q in queries]))
        if not first.is_set():
            first.set()
            threading.Event().wait(0.2)  # the first batch is slow: the others pile up meanwhile
        return [(q.rows * 10, q.rows.astype(np.float32)) for q in queries]

    monkeypatch.setattr(batcher_module, "answer_baskets", fake_answer)

    async def scenario():
        b = FoldInBatcher(FoldInConfig(), max_batch=8)
        await b.start()
        export_a, export_b = object(), object()
        queries = [BasketQuery(np.array([i]), 5, True) for i in range(12)]
        exports = [export_a if i % 3 else export_b for i in range(12)]
        answers = await asyncio.gather(*(b.submit(e, q) for e, q in zip(exports, queries, strict=True)))
        await b.stop()
        return answers, exports

    answers, exports = asyncio.run(scenario())
    assert [int(rows[0]) for rows, _ in answers] == [10 * i for i in range(12)]
    assert max(sizes) > 1 and sum(sizes) == 12  # requests were solved together, each once
    assert all(len(batch) <= 8 for _, batch in calls)
    for export, batch in calls:  # a batch never mixes two export versions
        assert all(exports[i] is export for i in batch)


def test_a_sampled_normaliser_tracks_the_full_catalogue_solve_where_nearest_items_alone_do_not():
    """Large catalogues: softmax over the nearest items plus an importance-weighted uniform sample."""
    from fedrec.serving.foldin import fold_in_sampled

    rng = np.random.default_rng(5)
    items = rng.normal(size=(20_000, 8)).astype(np.float32)
    rows = np.array([3, 17, 250])
    full = fold_in(items, rows, "softmax", reg=1.0, temperature=1.0)
    near = np.argsort(-(items @ items[rows].mean(0)))[:300]
    near_only = fold_in(items, rows, "softmax", reg=1.0, temperature=1.0, candidates=near)
    sampled = fold_in_sampled(items, rows, near, rng.integers(0, 20_000, 3000), reg=1.0, temperature=1.0)
    err_near = np.linalg.norm(near_only - full) / np.linalg.norm(full)
    err_sampled = np.linalg.norm(sampled - full) / np.linalg.norm(full)
    assert err_sampled < 0.1 < err_near
    # everything "near" and nothing sampled is the exact solve over the catalogue
    everything = fold_in_sampled(items[:500], rows, np.arange(500), np.array([], dtype=np.int64), 1.0, 1.0)
    np.testing.assert_allclose(everything, fold_in(items[:500], rows, "softmax", 1.0, 1.0), atol=1e-3)
