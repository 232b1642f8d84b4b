"""The one-standard-error rule (Breiman et al. 1984; Hastie et al., ESL 7.10), from sums only.

A choice among many candidates by validation recall picks the largest of several numbers that
differ by less than their noise: on MovieLens the co-purchase term's 16 candidates lay within
0.012 of each other, with a paired standard error of about 0.003 against the best, while the
share of customers given the same first product ran from 0.03 to 0.13. So, among the candidates
whose validation recall@20 is within one standard error of the best one's (the error of the
per-customer paired difference), this takes the one whose lists are least concentrated: the
smallest top-1 share (`metrics.top1_share`); on equal shares, the higher recall, then the earlier
candidate.

Every input is a sum over customers, so merchants send `CandidateSums` and the coordinator adds
them: per candidate, the sum of recalls; per pair, the sum of products (the paired variance
needs it); per candidate and product, how many customers were given it first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CandidateSums:
    recall: np.ndarray  # [c]: sum over customers of recall@20 under each candidate
    cross: np.ndarray  # [c, c]: sum over customers of recall_i * recall_j
    firsts: np.ndarray  # [c, items]: customers whose first item is each product, per candidate
    users: int

    def __add__(self, other: CandidateSums) -> CandidateSums:
        return CandidateSums(
            self.recall + other.recall, self.cross + other.cross, self.firsts + other.firsts, self.users + other.users
        )


def candidate_sums(recalls: np.ndarray, firsts: np.ndarray, n_items: int) -> CandidateSums:
    """One merchant's sums: `recalls` and `firsts` are [customers, candidates] (the same customers
    under every candidate)."""
    r = np.asarray(recalls, dtype=np.float64)
    counts = np.zeros((r.shape[1], n_items))
    for c in range(r.shape[1]):  # one bincount per candidate, not a loop over customers
        counts[c] = np.bincount(firsts[:, c], minlength=n_items)
    return CandidateSums(r.sum(axis=0), r.T @ r, counts, r.shape[0])


@dataclass(frozen=True)
class OneSEChoice:
    chosen: int
    best: int  # the highest validation recall
    means: np.ndarray  # [c] validation recall@20
    se: np.ndarray  # [c] standard error of (candidate - best), per customer paired
    top1_share: np.ndarray  # [c]
    within: np.ndarray  # [c] bool: within one standard error of the best

    def row(self, i: int) -> dict:
        """Candidate i's inputs to the rule, as the model card records them."""
        within = bool(self.within[i])
        return {"se_vs_best": float(self.se[i]), "top1_share": float(self.top1_share[i]), "within_one_se": within}


def least_concentrated_within_one_se(total: CandidateSums) -> OneSEChoice:
    """The rule above, on the summed `total`; with no customers, the first candidate."""
    n = total.users
    c = len(total.recall)
    if n == 0:
        zeros = np.zeros(c)
        return OneSEChoice(0, 0, zeros, zeros, zeros, np.arange(c) == 0)
    means = total.recall / n
    best = int(np.argmax(means))  # the first of equals: candidate 0 (the model as trained) wins ties
    diag = np.diag(total.cross)
    sum_sq = diag + diag[best] - 2.0 * total.cross[:, best]  # sum over customers of (r_c - r_best)^2
    gap = means - means[best]
    var = np.maximum(sum_sq - n * gap**2, 0.0) / max(n - 1, 1)
    se = np.sqrt(var / n)
    within = -gap <= se + 1e-12
    share = total.firsts.max(axis=1) / n
    order = sorted(np.flatnonzero(within), key=lambda i: (share[i], -means[i], i))
    return OneSEChoice(int(order[0]), best, means, se, share, within)


__all__ = ["CandidateSums", "OneSEChoice", "candidate_sums", "least_concentrated_within_one_se"]
