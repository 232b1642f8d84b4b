"""Attacks used to measure what the protections protect (pure functions; `fedrec attack-report`).

Purchased-items leakage: an honest-but-curious coordinator ranks the rows of the item-id table
in what it receives by their norm (centred), guessing that the rows a merchant's customers bought
moved most. Scored against the set the merchant really sold. Which way the signal points depends on the data
(a big shop's unsold rows can move most: the softmax pushes every unbought item down), and an
attacker can calibrate that on data of its own, so the score is oriented the way that leaks more:
the AUC reported is never below 0.5.
"""

from __future__ import annotations

import numpy as np
import scipy.stats


def row_scores(item_table: np.ndarray) -> np.ndarray:
    """The attacker's score per item: the norm of its row of an item-table-shaped array, centred."""
    rows = np.asarray(item_table, dtype=np.float64)
    return np.linalg.norm(rows - rows.mean(axis=0), axis=1)


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positives and negatives")
    ranks = scipy.stats.rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def leakage_metrics(scores: np.ndarray, sold: np.ndarray) -> dict[str, float]:
    """precision@|sold| (the attacker names as many items as were sold; equal to recall@|sold|;
    chance is |sold| / items), recall@2|sold| (how much of the sold set a list twice as long
    recovers), and AUC (chance 0.5)."""
    sold = np.asarray(sold, dtype=bool)
    if auc(scores, sold) < 0.5:  # the attacker's better orientation
        scores = -np.asarray(scores)
    k = int(sold.sum())
    order = np.argsort(-scores, kind="stable")
    hits_k = sold[order[:k]].sum()
    hits_2k = sold[order[: 2 * k]].sum()
    return {
        "precision": float(hits_k / k),
        "recall": float(hits_2k / k),
        "auc": auc(scores, sold),
        "sold": k,
        "items": int(len(sold)),
    }
