"""The one-standard-error rule behind the co-purchase term's choice (fedrec/federated/one_se.py)."""

import numpy as np
import pytest

from fedrec.federated.one_se import candidate_sums, least_concentrated_within_one_se

# Four validation customers, three candidates: A (the model as trained), B, C.
RECALLS = np.array(
    [
        [1.0, 0.5, 0.0],
        [0.0, 0.5, 0.0],
        [1.0, 1.0, 0.0],
        [0.0, 0.0, 0.0],
    ]
)
# First-ranked product per customer: A gives product 0 to three of four (share 3/4), B gives
# products 0 and 1 to two each (1/2), C gives each customer another product (1/4).
FIRSTS = np.array([[0, 0, 0], [0, 1, 1], [0, 0, 2], [1, 1, 3]])


def test_the_least_concentrated_candidate_within_one_standard_error_of_the_best_is_chosen():
    rule = least_concentrated_within_one_se(candidate_sums(RECALLS, FIRSTS, 5))
    np.testing.assert_allclose(rule.means, [0.5, 0.5, 0.0])
    assert rule.best == 0  # A and B tie on recall: the first (the model as trained) is the best
    # B - A = (-0.5, 0.5, 0, 0): mean 0, sample variance 0.5 / 3; C - A = (-1, 0, -1, 0): mean -0.5,
    # sample variance (2 - 4 * 0.25) / 3; the standard error is sqrt(variance / 4)
    np.testing.assert_allclose(rule.se, [0.0, np.sqrt(0.5 / 3 / 4), np.sqrt(1 / 3 / 4)])
    np.testing.assert_allclose(rule.top1_share, [0.75, 0.5, 0.25])
    assert rule.within.tolist() == [True, True, False]  # C is 0.5 behind, beyond its 0.29
    assert rule.chosen == 1  # B: as good within the noise, less concentrated; C is flatter but worse


def test_on_equal_concentration_the_higher_recall_wins_and_without_customers_the_model_as_trained():
    # B2: B's first items, recall (0.5, 0.5, 0.5, 0): 0.125 behind A, within its 0.24
    recalls = np.column_stack([RECALLS[:, :2], [0.5, 0.5, 0.5, 0.0]])
    firsts = np.column_stack([FIRSTS[:, :2], FIRSTS[:, 1]])
    rule = least_concentrated_within_one_se(candidate_sums(recalls, firsts, 5))
    assert rule.within.all() and rule.top1_share[1] == rule.top1_share[2]
    assert rule.chosen == 1
    none = least_concentrated_within_one_se(candidate_sums(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64), 5))
    assert none.chosen == 0


def test_merchants_sums_add_up_to_the_pooled_choice():
    rng = np.random.default_rng(0)
    recalls = rng.random((300, 6)) * (rng.random((300, 6)) < 0.4)
    firsts = rng.integers(0, 40, (300, 6))
    pooled = least_concentrated_within_one_se(candidate_sums(recalls, firsts, 40))
    cuts = [0, 17, 130, 300]
    parts = [candidate_sums(recalls[a:b], firsts[a:b], 40) for a, b in zip(cuts, cuts[1:], strict=False)]
    summed = least_concentrated_within_one_se(parts[0] + parts[1] + parts[2])
    assert summed.chosen == pooled.chosen
    np.testing.assert_allclose(summed.se, pooled.se)
    # the paired standard error is numpy's on the per-customer differences
    d = recalls - recalls[:, [pooled.best]]
    np.testing.assert_allclose(pooled.se, d.std(axis=0, ddof=1) / np.sqrt(300))
    assert pooled.top1_share == pytest.approx([np.bincount(firsts[:, c]).max() / 300 for c in range(6)])
