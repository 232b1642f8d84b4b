"""Offline evaluation by merchant. Each merchant reports only sums and a user count, which is
all a coordinator needs to average metrics across merchants without seeing any user's list.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.data import MerchantData
from fedrec.metrics import METRICS, catalogue_coverage, eligible_users, per_user_metrics, top1_share, topk_items
from fedrec.model import scoring_vectors


@dataclass(frozen=True)
class MetricSums:
    """Sufficient statistics of a mean: per-metric sums over `users` eligible users."""

    sums: dict[str, float]
    users: int

    def means(self) -> dict[str, float]:
        return {k: (v / self.users if self.users else float("nan")) for k, v in self.sums.items()}


def merchant_metric_sums(
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    exclude: sp.csr_matrix,
    truth: sp.csr_matrix,
    metrics: tuple[str, ...] = METRICS,
) -> MetricSums:
    ks = sorted({int(m.split("@")[1]) for m in metrics})
    keep = eligible_users(exclude, truth)
    if not keep.any():
        return MetricSums({m: 0.0 for m in metrics}, 0)
    idx = np.flatnonzero(keep)
    topk = topk_items(user_vecs[torch.from_numpy(idx)], item_vecs, exclude[idx], max(ks))
    per_user = per_user_metrics(topk, truth[idx], ks)
    return MetricSums({m: float(np.sum(per_user[m])) for m in metrics}, int(len(idx)))


def combine_sums(parts: list[MetricSums]) -> MetricSums:
    """The sum over merchants: all a coordinator needs for the overall mean (no merchant's own)."""
    return MetricSums({m: sum(p.sums[m] for p in parts) for m in parts[0].sums}, sum(p.users for p in parts))


def combine(parts: dict[str, MetricSums]) -> dict:
    """Overall (user-weighted) and per-merchant means (offline evaluation, where both are wanted)."""
    total = combine_sums(list(parts.values()))
    return {
        "overall": total.means(),
        "users": total.users,
        "per_merchant": {name: {**p.means(), "users": p.users} for name, p in parts.items()},
    }


def evaluate_test(
    merchant: MerchantData, user_vecs: torch.Tensor, item_vecs: torch.Tensor, item_bias: torch.Tensor | None = None
) -> MetricSums:
    """Test metrics: rank the catalogue minus everything bought before the cut-off."""
    users, items = scoring_vectors(user_vecs, item_vecs, item_bias, merchant.user_groups)
    return merchant_metric_sums(users, items, merchant.full_train, merchant.test)


def evaluate_test_all(
    merchants: list[MerchantData],
    users: dict[str, torch.Tensor],
    item_vecs: torch.Tensor,
    item_biases: dict[str, torch.Tensor | None] | None = None,
) -> dict:
    """Test metrics of every merchant (each with its own user vectors and item bias), combined."""
    biases = item_biases or {}
    return combine({m.name: evaluate_test(m, users[m.name], item_vecs, biases.get(m.name)) for m in merchants})


def evaluate_val(
    merchant: MerchantData,
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    item_bias: torch.Tensor | None = None,
    rows: np.ndarray | None = None,
) -> MetricSums:
    """Validation recall@20 for early stopping: train items excluded, val items as truth.

    `rows` limits it to those customers (`sample_customers`): at marketplace scale a full ranking
    of every validation customer costs more than a round of training.
    """
    recall, _ = val_recall_and_firsts(merchant, user_vecs, item_vecs, item_bias, rows)
    return MetricSums({"recall@20": float(np.sum(recall))}, len(recall))


def val_recall_and_firsts(
    merchant: MerchantData,
    user_vecs: torch.Tensor,
    item_vecs: torch.Tensor,
    item_bias: torch.Tensor | None = None,
    rows: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each validation customer's recall@20 and first-ranked item (`rows`: those customers only),
    train items excluded. They stay at the merchant: `evaluate_val` sends their sum, and a choice
    that needs a spread or a concentration sends sums of products and counts
    (`fedrec/federated/one_se.py`)."""
    users, items = scoring_vectors(user_vecs, item_vecs, item_bias, merchant.user_groups)
    train, val = merchant.train, merchant.val
    if rows is not None:
        users, train, val = users[torch.from_numpy(rows)], train[rows], val[rows]
    idx = np.flatnonzero(eligible_users(train, val))
    if not len(idx):
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    topk = topk_items(users[torch.from_numpy(idx)], items, train[idx], 20)
    return per_user_metrics(topk, val[idx], (20,))["recall@20"], topk[:, 0]


def sample_customers(truth: sp.csr_matrix, cap: int, seed: int) -> np.ndarray | None:
    """At most `cap` of the customers with a purchase in `truth`, drawn with `seed` (None: all)."""
    have = np.flatnonzero(truth.getnnz(axis=1) > 0)
    if not cap or len(have) <= cap:
        return None
    return np.sort(np.random.default_rng(seed).choice(have, size=cap, replace=False))


def recommendation_lists(
    merchants: list[MerchantData],
    users: dict[str, torch.Tensor],
    item_vecs: torch.Tensor,
    item_biases: dict[str, torch.Tensor | None] | None = None,
    k: int = 10,
) -> np.ndarray:
    """Every test customer's top-k (purchases before the cut-off excluded), stacked over merchants."""
    biases = item_biases or {}
    lists = []
    for m in merchants:
        idx = np.flatnonzero(eligible_users(m.full_train, m.test))
        u, v = scoring_vectors(users[m.name], item_vecs, biases.get(m.name), m.user_groups)
        lists.append(topk_items(u[torch.from_numpy(idx)], v, m.full_train[idx], k))
    return np.vstack(lists)


POPULARITY_WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def weighted_lists(
    m: MerchantData,
    users: torch.Tensor,
    item_vecs: torch.Tensor,
    bias: torch.Tensor | None,
    weight: float,
    split: str = "test",
) -> tuple[MetricSums, np.ndarray]:
    """One merchant's recall@20 sums and top-20 lists with its item bias scaled by `weight` (u . v +
    w b): on "val" (train excluded, validation as truth) or "test" (all before the cut-off excluded)."""
    if split not in ("val", "test"):
        raise ValueError(f"split must be val or test, not {split!r}")
    exclude, truth = (m.train, m.val) if split == "val" else (m.full_train, m.test)
    u, v = scoring_vectors(users, item_vecs, None if bias is None else weight * bias, m.user_groups)
    idx = np.flatnonzero(eligible_users(exclude, truth))
    if len(idx) == 0:  # no customer with a purchase in the truth slice
        return MetricSums({"recall@20": 0.0}, 0), np.empty((0, 20), dtype=np.int64)
    top = topk_items(u[torch.from_numpy(idx)], v, exclude[idx], 20)
    hits = float(per_user_metrics(top, truth[idx], (20,))["recall@20"].sum())
    return MetricSums({"recall@20": hits}, len(idx)), top


def popularity_weight_curve(
    merchants: list[MerchantData],
    users: dict[str, torch.Tensor],
    item_vecs: torch.Tensor,
    item_biases: dict[str, torch.Tensor | None],
    split: str = "test",
    weights: tuple[float, ...] = POPULARITY_WEIGHTS,
) -> dict[str, dict[str, float]]:
    """Recall@20 and concentration when each merchant's item bias is scaled by w (u . v + w b).

    Why: the bias is the shop's own popularity; at w = 1 (the trained score) it puts the same
    product first for many customers. Serving takes w per request (`popularity_weight`), so the
    trade-off is measured here: on "val" (train excluded, validation as truth; pass a model that
    never trained on validation) to choose by, on "test" to report.
    """
    out = {}
    for w in weights:
        parts, lists = [], []
        for m in merchants:
            sums, top = weighted_lists(m, users[m.name], item_vecs, item_biases.get(m.name), w, split)
            parts.append(sums)
            lists.append(top[:, :10])
        top10 = np.vstack(lists)
        out[f"{w:g}"] = {
            "recall@20": combine_sums(parts).means()["recall@20"],
            "top1_share": top1_share(top10),
            "coverage@10": catalogue_coverage(top10, item_vecs.shape[0]),
        }
    return out
