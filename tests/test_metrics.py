import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec.baselines import als_fold_in
from fedrec.metrics import basket_label_share, per_user_metrics, topk_items


def csr(rows, n_items):
    r, c = zip(*[(u, i) for u, items in enumerate(rows) for i in items], strict=True) if any(rows) else ((), ())
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(rows), n_items))


def test_recall_and_ndcg_by_hand():
    topk = np.array([[3, 1, 4, 0, 2]])
    truth = csr([[1, 2, 7]], 8)
    m = per_user_metrics(topk, truth, ks=(2, 5))
    # top-2 = {3, 1}: one hit of three test items
    assert m["recall@2"][0] == pytest.approx(1 / 3)
    # top-5 hits at ranks 2 and 5
    assert m["recall@5"][0] == pytest.approx(2 / 3)
    dcg = 1 / math.log2(3) + 1 / math.log2(6)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert m["ndcg@5"][0] == pytest.approx(dcg / idcg)
    assert m["ndcg@2"][0] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))


def test_recall_divides_by_all_test_items_not_k():
    truth = csr([list(range(10))], 20)
    topk = np.arange(5)[None, :]
    assert per_user_metrics(topk, truth, ks=(5,))["recall@5"][0] == pytest.approx(0.5)


def test_users_without_test_items_are_nan():
    m = per_user_metrics(np.array([[0, 1], [0, 1]]), csr([[0], []], 3), ks=(2,))
    assert m["recall@2"][0] == 1.0 and np.isnan(m["recall@2"][1])


def test_topk_excludes_train_items():
    users = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[5.0, 0.0], [4.0, 0.0], [3.0, 0.0], [2.0, 0.0]])
    exclude = csr([[0, 2]], 4)
    assert topk_items(users, items, exclude, 2).tolist() == [[1, 3]]


def test_coverage_and_top1_share_by_hand():
    from fedrec.metrics import catalogue_coverage, top1_share

    topk = np.array([[0, 1], [0, 2], [3, 1], [0, 1]])
    assert catalogue_coverage(topk, n_items=8) == 4 / 8
    assert top1_share(topk) == 3 / 4  # item 0 is first for 3 of 4 users


def test_same_label_rate_counts_neighbours_sharing_a_label_and_skips_unlabelled_items():
    from fedrec.metrics import cosine, same_label_rate

    # items 0,1 share label A; item 2 has B; item 3 has no label
    labels = np.array([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=float)
    sim = np.array(
        [
            [9, 5, 1, 0],  # 0's nearest (self left out): 1 (A) -> shares
            [5, 9, 6, 0],  # 1's nearest: 2 (B) -> does not
            [1, 2, 9, 3],  # 2's nearest: 3 (none) -> does not
            [0, 0, 0, 9],  # unlabelled: left out
        ],
        dtype=float,
    )
    assert same_label_rate(sim, labels, k=1) == 1 / 3
    vecs = np.array([[1.0, 0.0], [10.0, 0.1], [0.0, 1.0]])
    c = cosine(vecs)
    assert np.allclose(np.diag(c), 1.0) and c[0, 1] > 0.99 and abs(c[0, 2]) < 1e-9


def test_same_label_rate_a_block_of_rows_at_a_time_is_the_same_number():
    from fedrec.metrics import same_label_rate, same_label_rate_rows

    rng = np.random.default_rng(3)
    labels = (rng.random((23, 4)) < 0.3).astype(float)  # some items carry no label
    assert (labels.sum(axis=1) == 0).any()
    sim = rng.normal(size=(23, 23))
    whole = same_label_rate(sim, labels, k=3)
    for chunk in (1, 5, 23, 100):
        assert same_label_rate_rows(lambda rows: sim[rows], 23, labels, k=3, chunk=chunk) == whole
    # the row blocks must leave each item's own score out, not the block's first rows'
    assert same_label_rate_rows(lambda rows: sim[rows] + 100 * np.eye(23)[rows], 23, labels, k=3, chunk=5) == whole


def test_basket_label_share_by_hand():
    # items 0-3 carry label 0, items 4-5 label 1; one basket {0} of label 0
    labels = np.array([[1, 0], [1, 0], [1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)
    scores = np.array([[9.0, 5.0, 1.0, 0.0, 4.0, 3.0]])  # top-2 without item 0: items 1 and 4
    assert basket_label_share(scores, [np.array([0])], np.array([0]), labels, k=2) == 0.5
    assert basket_label_share(scores, [np.array([0, 1])], np.array([0]), labels, k=2) == 0.0  # 4 and 5


def test_als_fold_in_is_implicits_recalculated_user():
    from implicit.cpu.als import AlternatingLeastSquares

    rng = np.random.default_rng(0)
    x = sp.csr_matrix((rng.random((30, 20)) < 0.2).astype(np.float32))
    model = AlternatingLeastSquares(factors=4, regularization=0.1, alpha=5.0, iterations=3, random_state=0)
    model.fit(x, show_progress=False)
    basket = np.array([2, 5, 7])
    row = sp.csr_matrix((np.ones(3, dtype=np.float32), (np.zeros(3), basket)), shape=(1, 20))
    want = np.asarray(model.recalculate_user(0, row)).ravel()
    got = als_fold_in(np.asarray(model.item_factors), [basket], alpha=5.0, reg=0.1)[0]
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
