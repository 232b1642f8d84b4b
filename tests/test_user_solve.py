"""The per-round user solve: each merchant starts a round from its customers' MAP user vectors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.config import load_config
from fedrec.errors import ConfigError
from fedrec.features import build_item_features
from fedrec.federated.local import LocalConfig, local_update
from fedrec.model import ItemTower, ModelConfig, init_user_embeddings
from fedrec.softmax_foldin import EXACT_TOL, fold_in_softmax_batch, solve_user_vectors, solve_user_vectors_sampled

MODEL = ModelConfig(dim=8, feature_dim=8, hidden=16, hash_buckets=512, use_content=False)


def objective(items: np.ndarray, purchases: sp.csr_matrix, users: np.ndarray, temperature: float, reg: float):
    """Per customer: sum over purchases of -log softmax(V u / T) + reg |u|^2 (the solve's target)."""
    scores = users @ items.T / temperature
    logz = np.log(np.exp(scores - scores.max(1, keepdims=True)).sum(1)) + scores.max(1)
    picked = np.asarray(purchases.multiply(scores).sum(1)).ravel()
    return purchases.getnnz(axis=1) * logz - picked + reg * (users**2).sum(1)


def test_solve_matches_the_exact_fold_in_and_a_warm_start_reaches_the_same_optimum():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(60, 5))
    purchases = sp.csr_matrix((rng.random((30, 60)) < 0.08).astype(np.float32))
    purchases = sp.csr_matrix(purchases.multiply((np.arange(30) != 3)[:, None]))  # customer 3: nothing to solve
    purchases.eliminate_zeros()
    rows, solved = solve_user_vectors(items, purchases, 0.5, 2.0, hessian_items=None)
    assert 3 not in rows and len(rows) == (purchases.getnnz(axis=1) > 0).sum()
    exact = fold_in_softmax_batch(
        items, [purchases[r].indices for r in rows], 0.5, 2.0, tol=EXACT_TOL
    )  # fmt: skip
    np.testing.assert_allclose(solved, exact, atol=1e-3)
    _, warm = solve_user_vectors(items, purchases, 0.5, 2.0, init=rng.normal(size=(30, 5)), hessian_items=None)
    np.testing.assert_allclose(warm, exact, atol=1e-3)


def test_local_update_starts_from_better_user_vectors(tiny_dataset):
    m = tiny_dataset.merchants[0]
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    torch.manual_seed(0)
    state = ItemTower(tiny_dataset.n_items, MODEL).state_dict()
    users = init_user_embeddings(m.n_users, MODEL, torch.Generator().manual_seed(0))
    frozen = LocalConfig(lr=0.0, user_lr=0.0, temperature=1.0, user_solve_reg=0.0)  # Adam with lr 0: only the
    # solve (when on) moves the users
    plain = local_update(state, users, m.train, features, MODEL, frozen, seed=1)
    torch.testing.assert_close(plain.user_embeddings, users)
    solved = local_update(state, users, m.train, features, MODEL, dataclasses.replace(frozen, user_solve_reg=3.0), 1)
    vecs = ItemTower(tiny_dataset.n_items, MODEL)
    vecs.load_state_dict(state)
    with torch.no_grad():
        items = vecs(features).double().numpy()
    before = objective(items, m.train, users.double().numpy(), 1.0, 3.0)
    after = objective(items, m.train, solved.user_embeddings.double().numpy(), 1.0, 3.0)
    active = np.flatnonzero(m.train.getnnz(axis=1) > 0)
    exact = fold_in_softmax_batch(items, [m.train[r].indices for r in active], 1.0, 3.0, tol=EXACT_TOL)
    best = objective(items, m.train[active], exact, 1.0, 3.0)
    assert np.all(after[active] < before[active])  # every customer's MAP objective improved ...
    gap_before, gap_after = before[active] - best, after[active] - best
    assert gap_after.sum() < 0.05 * gap_before.sum()  # ... and the warm-started steps got near the optimum


def test_user_solve_needs_the_softmax_loss():
    with pytest.raises(ConfigError, match="user_solve_reg"):
        load_config(None, {"local.user_solve_reg": 3.0, "local.loss": "bpr"})
    with pytest.raises(ConfigError, match="user_solve_reg"):
        load_config(None, {"local.user_solve_reg": -1.0})


def test_a_grouped_bias_solves_each_merchants_customers_with_that_merchants_own_bias(tiny_dataset):
    """The centralized client's solve: customers of merchant g see bias row g, nobody else's."""
    from fedrec.data import pooled

    pool = pooled(tiny_dataset)
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    model = dataclasses.replace(MODEL, merchant_item_bias=True)
    torch.manual_seed(0)
    state = ItemTower(tiny_dataset.n_items, model).state_dict()
    users = init_user_embeddings(pool.n_users, model, torch.Generator().manual_seed(0))
    n_groups = int(pool.user_groups.max()) + 1
    bias = torch.randn(n_groups, tiny_dataset.n_items, generator=torch.Generator().manual_seed(1)) * 3
    only_solve = LocalConfig(lr=0.0, user_lr=0.0, bias_lr=0.0, temperature=1.0, user_solve_reg=3.0)
    grouped = local_update(state, users, pool.train, features, model, only_solve, 1, bias, None, pool.user_groups)
    for g in range(n_groups):
        rows = np.flatnonzero(pool.user_groups == g)
        alone = local_update(state, users[rows], pool.train[rows], features, model, only_solve, 1, bias[g])
        torch.testing.assert_close(grouped.user_embeddings[rows], alone.user_embeddings)


def _zipf_purchases(rng: np.random.Generator, customers: int, items: int) -> sp.csr_matrix:
    pop = rng.zipf(1.5, items).astype(float)
    pop /= pop.sum()
    baskets = [rng.choice(items, rng.integers(1, 12), replace=False, p=pop) for _ in range(customers)]
    rows = np.repeat(np.arange(customers), [len(b) for b in baskets])
    return sp.csr_matrix((np.ones(len(rows)), (rows, np.concatenate(baskets))), shape=(customers, items))


def test_the_sampled_solve_is_the_exact_one_when_the_draw_covers_the_catalogue():
    """Above the full-softmax switch each chunk is solved over what it bought plus uniform draws,
    each standing in for (others / drawn) products; a draw that covers every product is exact."""
    rng = np.random.default_rng(0)
    items = rng.normal(size=(60, 5))
    purchases = _zipf_purchases(rng, 30, 60)
    rows, exact = solve_user_vectors(items, purchases, 0.5, 2.0, hessian_items=None)
    rows_s, sampled = solve_user_vectors_sampled(
        lambda ids: items[ids], purchases, 60, 0.5, 2.0, 6000, np.random.default_rng(1), hessian_items=None
    )  # fmt: skip
    np.testing.assert_array_equal(rows_s, rows)
    np.testing.assert_allclose(sampled, exact, atol=1e-6)


def test_the_sampled_solve_needs_its_uniform_draws_to_track_the_full_solve():
    """What the importance weights buy: the bought products alone miss most of the normaliser."""
    rng = np.random.default_rng(0)
    items = rng.normal(size=(5000, 8))
    purchases = _zipf_purchases(rng, 200, 5000)
    _, exact = solve_user_vectors(items, purchases, 1.0, 1.0, hessian_items=None)

    def error(negatives: int) -> float:
        _, got = solve_user_vectors_sampled(
            lambda ids: items[ids], purchases, 5000, 1.0, 1.0, negatives, np.random.default_rng(1), hessian_items=None
        )  # fmt: skip
        return float(np.median(np.linalg.norm(got - exact, axis=1) / np.linalg.norm(exact, axis=1)))

    assert error(2000) < 0.1 < 0.3 < error(0)


def test_a_local_update_above_the_switch_solves_users_over_a_sample(tiny_dataset):
    """A catalogue above `full_softmax_max_items` trains the sampled softmax and solves its users
    the same way, with their own weight (`sampled_user_solve_reg`; `user_solve_reg` is the full
    solve's): with the tower frozen, every customer's full-catalogue objective improves."""
    m = tiny_dataset.merchants[0]
    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    torch.manual_seed(0)
    state = ItemTower(tiny_dataset.n_items, MODEL).state_dict()
    users = init_user_embeddings(m.n_users, MODEL, torch.Generator().manual_seed(0))
    frozen = LocalConfig(lr=0.0, user_lr=0.0, temperature=1.0, user_solve_reg=0.0, sampled_user_solve_reg=3.0,
                         full_softmax_max_items=10, uniform_negatives=tiny_dataset.n_items)  # fmt: skip
    solved = local_update(state, users, m.train, features, MODEL, frozen, 1)
    off = local_update(
        state, users, m.train, features, MODEL, dataclasses.replace(frozen, sampled_user_solve_reg=0.0), 1
    )
    torch.testing.assert_close(off.user_embeddings, users)
    vecs = ItemTower(tiny_dataset.n_items, MODEL)
    vecs.load_state_dict(state)
    with torch.no_grad():
        items = vecs(features).double().numpy()
    active = np.flatnonzero(m.train.getnnz(axis=1) > 0)
    before = objective(items, m.train, users.double().numpy(), 1.0, 3.0)[active]
    after = objective(items, m.train, solved.user_embeddings.double().numpy(), 1.0, 3.0)[active]
    assert np.all(after < before)


def _same_update(a, b) -> bool:
    same_delta = a.delta.keys() == b.delta.keys() and all(torch.equal(a.delta[k], b.delta[k]) for k in a.delta)
    return same_delta and torch.equal(a.user_embeddings, b.user_embeddings) and a.mean_loss == b.mean_loss


@pytest.mark.parametrize(
    "model, local",
    [
        # the content tower through the token-row cut, the softmax default
        (ModelConfig(dim=8, feature_dim=8, hidden=16, hash_buckets=4096), LocalConfig(temperature=1.0)),
        # ids only, ials with SGD item steps (ALS's exact user step)
        (MODEL, LocalConfig(loss="ials", temperature=1.0)),
    ],
)
def test_round_vectors_give_the_update_that_computes_them_itself(tiny_dataset, model, local):
    """The in-process runtime computes the received tower's vectors once a round for every merchant's
    user solve: each update must be the one it would compute alone, bit for bit, and must read them."""
    from fedrec.federated.local import round_vectors
    from fedrec.federated.token_rows import token_rows

    features = build_item_features(tiny_dataset.items, model.hash_buckets)
    assert (token_rows(features, model) is not None) == model.use_content  # the cut is what is compared
    torch.manual_seed(0)
    state = ItemTower(tiny_dataset.n_items, model).state_dict()
    vectors = round_vectors(state, features, model, local)
    assert vectors is not None and vectors.shape == (tiny_dataset.n_items, model.dim)
    for i, m in enumerate(tiny_dataset.merchants):
        users = init_user_embeddings(m.n_users, model, torch.Generator().manual_seed(i))
        alone = local_update(state, users, m.train, features, model, local, seed=i)
        shared = local_update(state, users, m.train, features, model, local, seed=i, vectors=vectors)
        assert _same_update(alone, shared), m.name
        wrong = local_update(state, users, m.train, features, model, local, seed=i, vectors=np.zeros_like(vectors))
        assert not torch.equal(wrong.user_embeddings, alone.user_embeddings)  # the solve reads what it is given


def test_round_vectors_only_where_the_update_solves_over_the_whole_catalogue(tiny_dataset):
    from fedrec.federated.local import round_vectors

    features = build_item_features(tiny_dataset.items, MODEL.hash_buckets)
    state = ItemTower(tiny_dataset.n_items, MODEL).state_dict()
    small = tiny_dataset.n_items - 1  # the catalogue is above this switch: the sampled solve
    assert round_vectors(state, features, MODEL, LocalConfig(user_solve_reg=0.0)) is None
    assert round_vectors(state, features, MODEL, LocalConfig(full_softmax_max_items=small)) is None
    exact_als = LocalConfig(loss="ials", ials_item_step="exact", full_softmax_max_items=small)
    assert round_vectors(state, features, MODEL, exact_als) is not None  # ALS has no sampled solve
