"""The ials loss: its Gramian form is the full weighted sum, the user solve is its minimiser, the
tower's tables take plain SGD steps (so merchants' deltas add up), and the basket fold-in matches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.config import load_config
from fedrec.errors import ConfigError
from fedrec.federated.aggregation import resolve_rule
from fedrec.federated.local import LocalConfig, local_update
from fedrec.ials_users import solve_ials_baskets, solve_ials_users
from fedrec.losses import ials_loss
from fedrec.model import ModelConfig, init_user_embeddings, item_tower_shapes, new_item_tower
from tests.toy_merchant import toy_merchant

ALPHA = 4.0
MODEL = ModelConfig(dim=6, feature_dim=6, hidden=8, hash_buckets=64)


def _weighted_squares(u: torch.Tensor, v: torch.Tensor, bought: np.ndarray, b: torch.Tensor) -> torch.Tensor:
    """The iALS objective spelled out over every (customer, item) pair: weight 1 + alpha and target 1
    where bought, weight 1 and target 0 elsewhere."""
    x = u @ v.T + b
    p = torch.from_numpy(bought.astype(np.float64))
    return ((1.0 + ALPHA * p) * (p - x).pow(2)).sum()


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, sp.csr_matrix]:
    rng = np.random.default_rng(seed)
    dense = (rng.random((7, 15)) < 0.3).astype(np.float64)
    dense[np.arange(7), rng.integers(0, 15, 7)] = 1.0  # every customer bought something
    bought = sp.csr_matrix(dense)
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(7, 3, generator=g, dtype=torch.float64)
    v = torch.randn(15, 3, generator=g, dtype=torch.float64)
    b = torch.randn(15, generator=g, dtype=torch.float64) * 0.3
    return u, v, b, bought.tocsr()


def test_the_gramian_form_equals_the_sum_over_every_customer_and_item():
    u, v, b, bought = _problem()
    coo = bought.tocoo()
    rows, cols = torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))
    share = 1.0 / torch.from_numpy(np.diff(bought.indptr)).double()
    mean = ials_loss(u[rows], v[cols], v.T @ v, share[rows], ALPHA, b[cols], b @ v, b.pow(2).sum())
    want = _weighted_squares(u, v, bought.toarray(), b)
    torch.testing.assert_close(mean * bought.nnz, want)
    # and without a bias
    mean = ials_loss(u[rows], v[cols], v.T @ v, share[rows], ALPHA)
    torch.testing.assert_close(mean * bought.nnz, _weighted_squares(u, v, bought.toarray(), torch.zeros(15)))


@pytest.mark.parametrize("with_bias", [False, True])
def test_the_user_solve_is_the_minimiser(with_bias):
    _, v, b, bought = _problem(1)
    bias = b if with_bias else None
    solved = torch.from_numpy(
        solve_ials_users(v.numpy(), bought, ALPHA, reg=0.5, bias=None if bias is None else bias.numpy())
    ).requires_grad_(True)
    obj = _weighted_squares(solved, v, bought.toarray(), b if with_bias else torch.zeros(15))
    (obj + 0.5 * solved.pow(2).sum()).backward()
    assert solved.grad.abs().max() < 1e-9
    moved = solved.detach() + 0.05  # and it is a minimum, not just a stationary point
    assert (
        _weighted_squares(moved, v, bought.toarray(), b if with_bias else torch.zeros(15)) + 0.5 * moved.pow(2).sum()
        > obj.detach() + 0.5 * solved.detach().pow(2).sum()
    )


def test_the_tables_take_plain_sgd_steps_so_a_delta_is_the_gradient():
    """One batch, users fixed (no solve, user lr 0), no weight decay: the id table's delta is exactly
    -ials_lr x the loss gradient. Adam would have rescaled each coordinate to about lr."""
    train, features = toy_merchant(n_users=20, n_items=50, per_user=4, buckets=MODEL.hash_buckets)
    state = new_item_tower(50, MODEL, 0).state_dict()
    users = init_user_embeddings(20, MODEL, torch.Generator().manual_seed(1)) * 10
    cfg = LocalConfig(loss="ials", ials_alpha=ALPHA, ials_lr=0.7, user_solve_reg=0.0, user_lr=0.0,
                      weight_decay=0.0, batch_size=1000, temperature=1.0)  # fmt: skip
    res = local_update(state, users, train, features, MODEL, cfg, seed=0)
    tower = new_item_tower(50, MODEL, 0)
    tower.load_state_dict(state)
    v = tower(features)
    coo = train.tocoo()
    rows, cols = torch.from_numpy(coo.row.astype(np.int64)), torch.from_numpy(coo.col.astype(np.int64))
    share = 1.0 / torch.from_numpy(np.diff(train.indptr)).float()
    ials_loss(users[rows], v[cols], v.T @ v, share[rows], ALPHA).backward()
    torch.testing.assert_close(res.delta["item_emb.weight"], -0.7 * tower.item_emb.weight.grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(res.delta["feat_emb.weight"], -0.7 * tower.feat_emb.weight.grad, rtol=1e-4, atol=1e-7)
    assert torch.equal(res.user_embeddings, users)


def test_training_with_ials_lowers_the_merchants_objective():
    train, features = toy_merchant(n_users=30, n_items=40, per_user=5, buckets=MODEL.hash_buckets)
    state = new_item_tower(40, MODEL, 0).state_dict()
    users = init_user_embeddings(30, MODEL, torch.Generator().manual_seed(1))
    cfg = LocalConfig(loss="ials", ials_alpha=ALPHA, user_solve_reg=1.0, temperature=1.0, batch_size=32)

    def objective(st: dict, us: torch.Tensor) -> float:
        tower = new_item_tower(40, MODEL, 0)
        tower.load_state_dict(st)
        with torch.no_grad():
            return float(_weighted_squares(us.double(), tower(features).double(), train.toarray(), torch.zeros(40)))

    before = None
    for rnd in range(8):
        res = local_update(state, users, train, features, MODEL, cfg, seed=rnd)
        state = {k: state[k] + res.delta[k] for k in state}
        users = res.user_embeddings
        before = objective(state, users) if rnd == 0 else before
    assert objective(state, users) < 0.8 * before


def test_the_served_basket_fold_in_is_the_training_solve():
    _, v, b, bought = _problem(2)
    baskets = [bought.indices[bought.indptr[i] : bought.indptr[i + 1]] for i in range(3)]
    want = solve_ials_users(v.numpy(), bought[:3], ALPHA, 0.5, b.numpy())
    np.testing.assert_allclose(solve_ials_baskets(v.numpy(), baskets, ALPHA, 0.5, b.numpy()), want)
    doubled = [np.concatenate([baskets[0], baskets[0][:1]])]  # a repeated product counts once
    np.testing.assert_allclose(solve_ials_baskets(v.numpy(), doubled, ALPHA, 0.5, b.numpy())[0], want[0])
    with pytest.raises(ValueError, match="at least one item"):
        solve_ials_baskets(v.numpy(), [np.array([], dtype=np.int64)], ALPHA, 0.5)


def test_auto_aggregation_is_fedavg_under_ials():
    shapes = item_tower_shapes(100, ModelConfig(use_content=False))
    assert resolve_rule("auto", shapes, private=False, robust="none") == "rowwise"
    assert resolve_rule("auto", shapes, private=False, robust="none", loss="ials") == "fedavg"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"local.loss": "ials", "local.temperature": 0.0}, "ials loss has none"),
        ({"local.loss": "ials", "federation.aggregation": "rowwise"}, "every item row"),
        ({"local.ials_lr": 0.0}, "ials_lr must be > 0"),
        ({"local.ials_alpha": -1.0}, "ials_alpha must be >= 0"),
        ({"local.loss": "ials", "privacy.epsilon": 8.0}, "softmax. only"),
    ],
)
def test_bad_ials_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {"data.dataset": "synthetic", **overrides})


def test_a_catalogue_above_the_full_softmax_limit_is_refused_under_ials():
    train, features = toy_merchant(n_users=10, n_items=300, buckets=MODEL.hash_buckets)
    state = new_item_tower(300, MODEL, 0).state_dict()
    cfg = dataclasses.replace(LocalConfig(loss="ials", temperature=1.0), full_softmax_max_items=100)
    with pytest.raises(ConfigError, match="whole catalogue"):
        local_update(state, init_user_embeddings(10, MODEL, torch.Generator()), train, features, MODEL, cfg, 0)
    # ALS's exact item step scores no softmax: one tower pass a round, so the switch does not bar it
    ids = dataclasses.replace(MODEL, use_content=False)
    exact = dataclasses.replace(cfg, ials_item_step="exact", user_solve_reg=3.0)
    users = init_user_embeddings(10, ids, torch.Generator())
    res = local_update(new_item_tower(300, ids, 0).state_dict(), users, train, features, ids, exact, 0)
    assert res.item_terms is not None and res.item_terms["als/lhs"].shape == (300, 6, 6)
