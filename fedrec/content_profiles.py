"""Customers' content profiles for the content match (`fedrec/content_match.py`), in numpy alone:
the serving app folds baskets in with them and must not import torch."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp


def profiles(purchases: sp.csr_matrix, z: np.ndarray) -> np.ndarray:
    """p for every row of `purchases` (over the products of z): the unit-length sum of the z of
    what was bought (zero for no purchases)."""
    p = np.asarray(purchases @ z.astype(np.float64))
    return (p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def basket_matrix(baskets: list[np.ndarray], n_items: int) -> sp.csr_matrix:
    """Baskets (rows of a catalogue) as a purchase matrix: a product twice counts twice."""
    sizes = [len(b) for b in baskets]
    data = np.ones(sum(sizes))
    return sp.csr_matrix((data, np.concatenate(baskets), np.cumsum([0, *sizes])), shape=(len(baskets), n_items))


def with_basket_profiles(users: np.ndarray, baskets: list[np.ndarray], z: np.ndarray, weight: float) -> np.ndarray:
    """[u, w p] for anonymous baskets: what a customer's vector holds, from the basket instead of a
    purchase history."""
    p = profiles(basket_matrix(baskets, z.shape[0]), z)
    return np.hstack([users.astype(np.float32), np.float32(weight) * p])


def fold_in_with_match(
    fold: Callable[[np.ndarray], np.ndarray],
    vectors: np.ndarray,
    baskets: list[np.ndarray],
    weight: float,
    width: int,
    copurchase: tuple[float, int] = (0.0, 0),
) -> np.ndarray:
    """Baskets' user vectors for a model whose vectors end with a content-match block `width`
    wide (0: none), and after it a co-purchase block (`copurchase`: its weight and width, the
    trained catalogue; `fedrec/copurchase.py`): `fold` solves u against the tower's part alone
    (training never saw either block), then each basket's own w p and w x follow it, as a
    customer's do. The API and both evaluations fold in by this."""
    co_weight, co_width = copurchase
    matched = vectors[:, : vectors.shape[1] - co_width]
    tower = matched[:, : matched.shape[1] - width]
    users = fold(tower)
    if width:
        users = with_basket_profiles(users, baskets, matched[:, tower.shape[1] :], weight)
    if co_width:
        bought = basket_matrix(baskets, vectors.shape[0])[:, :co_width].toarray()
        users = np.hstack([users.astype(np.float32), np.float32(co_weight) * bought.astype(np.float32)])
    return users
