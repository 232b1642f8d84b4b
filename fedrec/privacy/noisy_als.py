"""Customer-level DP for ALS's item step: clipped, noised sufficient statistics (DP-ALS).

DP-SGD noises every local step, and on the shipped data the tower's signal in a customer's
clipped gradient stays below that noise (README, "Privacy against utility"). ALS needs far fewer
releases: after each merchant's exact user step (each customer's own data and the public item
table only, so it needs no noise), the item table is a linear solve from two sums over customers,

    v_i = (1 + alpha) (U'U + reg I)^-1  sum_{c bought i} w_c u_c

(Chien et al., 2021, "Private Alternating Least Squares", bound each customer's part of these
sums and noise them once per round). To bound one customer's part, every u_c is clipped to L2
norm `clip` and each of their purchases weighted by w_c = min(1, sqrt(max_purchases / n_c)), so
their whole contribution is at most clip x sqrt(max_purchases) in the per-product sums (RHS) and
clip^2 in the Gram matrix U'U. Both are scaled to a joint sensitivity of 1 (RHS_SHARE of it to
the per-product sums, where the signal is scarce; the Gram is a sum over every customer) and take
Gaussian noise of `noise_multiplier` per coordinate: one Gaussian mechanism a round, accounted
without subsampling (`fedrec.privacy.accountant`).

What it gives up against the exact item step (`fedrec.federated.ials_item_step`): the per-product
confidence term alpha U_i'U_i is left out of the left-hand side (noising a d x d matrix per
product would swamp it), so every product shares one d x d system; on MovieLens validation
that cost nothing measurable against a noised-count estimate of it (one seed: 0.2365 vs 0.2349).

A merchant's own popularity (`model.merchant_item_bias` with `privacy.count_share` > 0): a third
block of the same Gaussian release, each product's weighted buyer count at that merchant (one
customer adds w_c to each product they bought, at most sqrt(max_purchases) in L2), which takes
`count_share` of the squared sensitivity and never leaves the merchant. Its bias, count_weight x
log(1 + count) from the mean of the rounds' releases so far, ranks a shop's own best sellers up in
its customers' lists (the user step does not fit around it: it only ranks). It is post-processing
of the release, so it costs nothing beyond the round's accounted mechanism. Other customers' lists
read it, so it takes the whole noise even when the summed blocks split it.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.model import ID_TABLE as TABLE  # the id table it solves (one row per product, no content tower)

GRAM, RHS = "dp_als/gram", "dp_als/rhs"  # RHS: sum of w_c u_c per product (the 1 + alpha is the solve's)
COUNTS = "dp_als/counts"  # per product, the merchant's weighted buyers: kept at the merchant, never sent
RHS_SHARE = 0.95  # of the squared sensitivity: the per-product sums; the Gram gets the rest


def purchase_weights(purchases: sp.csr_matrix, max_purchases: float) -> np.ndarray:
    """Per customer, w_c = min(1, sqrt(max_purchases / n_c)): the weight of each of their purchases,
    so that n_c purchases add at most sqrt(max_purchases) in L2 over the catalogue."""
    n = np.diff(purchases.indptr).astype(np.float64)
    return np.minimum(1.0, np.sqrt(max_purchases / np.maximum(n, 1.0)))


def clip_rows(users: np.ndarray, clip: float) -> np.ndarray:
    norms = np.linalg.norm(users, axis=1, keepdims=True)
    return users * np.minimum(1.0, clip / np.maximum(norms, 1e-300))


def block_scales(clip: float, max_purchases: float, count_share: float = 0.0) -> tuple[float, float, float]:
    """(s_rhs, s_gram, s_counts): dividing each block by its scale bounds one customer's joint L2 part
    by 1. `count_share` of the squared sensitivity goes to the merchant's counts (0: no counts block,
    s_counts inf), the rest to the summed blocks."""
    rest = 1.0 - count_share
    s_counts = math.sqrt(max_purchases / count_share) if count_share > 0 else math.inf
    return (
        clip * math.sqrt(max_purchases / (RHS_SHARE * rest)),
        clip * clip / math.sqrt((1.0 - RHS_SHARE) * rest),
        s_counts,
    )


def clipped_terms(users: np.ndarray, purchases: sp.csr_matrix, clip: float, max_purchases: float) -> dict:
    """One merchant's bounded sums, before noise (pure): RHS (items x d), GRAM (d x d) and COUNTS
    (items), float64."""
    # a product counts once per customer, whatever quantity or repeated entries the matrix holds: a
    # repeated entry would add w_c u_c twice to one row, past the bound
    bought = sp.csr_matrix(purchases, dtype=np.float64, copy=True)
    bought.sum_duplicates()
    bought.eliminate_zeros()
    bought.data[:] = 1.0
    u = clip_rows(np.asarray(users, dtype=np.float64), clip)
    u[np.diff(bought.indptr) == 0] = 0.0  # a customer without purchases adds nothing
    weighted = sp.diags(purchase_weights(bought, max_purchases)) @ bought
    return {RHS: np.asarray(weighted.T @ u), GRAM: u.T @ u, COUNTS: np.asarray(weighted.sum(axis=0)).ravel()}


def noised_terms(
    terms: dict, clip: float, max_purchases: float, std: float, gen: torch.Generator, count_share: float = 0.0
) -> dict[str, torch.Tensor]:
    """The summed blocks plus Gaussian noise of `std` (noise multiplier, or a merchant's share of it)
    per unit of sensitivity. The Gram's noise is drawn on its upper triangle and mirrored, so it
    stays symmetric and its sensitivity is the triangle's, at most clip^2."""
    s_rhs, s_gram, _ = block_scales(clip, max_purchases, count_share)
    rhs = torch.from_numpy(terms[RHS])
    gram = torch.from_numpy(terms[GRAM])
    d = gram.shape[0]
    noise_rhs = torch.randn(rhs.shape, generator=gen, dtype=torch.float64)
    upper = torch.triu(torch.randn((d, d), generator=gen, dtype=torch.float64))
    noise_gram = upper + torch.triu(upper, 1).T
    return {RHS: (rhs + std * s_rhs * noise_rhs).float(), GRAM: (gram + std * s_gram * noise_gram).float()}


def noised_counts(
    terms: dict, clip: float, max_purchases: float, count_share: float, std: float, gen: torch.Generator
) -> torch.Tensor:
    """The merchant's counts plus Gaussian noise of `std` (the whole noise multiplier: the counts are
    never summed with other merchants') per unit of sensitivity. Drawn after `noised_terms`."""
    _, _, s_counts = block_scales(clip, max_purchases, count_share)
    counts = torch.from_numpy(terms[COUNTS])
    return (counts + std * s_counts * torch.randn(counts.shape, generator=gen, dtype=torch.float64)).float()


def count_bias(counts: torch.Tensor, weight: float) -> torch.Tensor:
    """The merchant's item bias from its noised counts: weight x sign(c) log(1 + |c|). Invertible
    (`bias_counts`), so the bias itself carries the running mean of the rounds' releases."""
    return weight * torch.sign(counts) * torch.log1p(counts.abs())


def bias_counts(bias: torch.Tensor, weight: float) -> torch.Tensor:
    """The counts a `count_bias` came from."""
    scaled = bias.double() / weight
    return (torch.sign(scaled) * torch.expm1(scaled.abs())).float()


def averaged_counts(
    previous_bias: torch.Tensor, fresh: torch.Tensor, weight: float, release: int, noise_decay: float = 1.0
) -> torch.Tensor:
    """The mean of this merchant's `release` noised count releases so far (the counts do not change
    from round to round, so the mean keeps the signal and divides the noise's variance by `release`:
    post-processing, free). Under a noise schedule (`privacy.noise_decay`), each release weighs by
    the inverse of its noise variance, decay^-2(t - 1), the mean with the least variance."""
    if release <= 1:
        return fresh
    mean = bias_counts(previous_bias, weight)
    if noise_decay == 1:
        return mean + (fresh - mean) / release
    precision = noise_decay ** (-2.0 * np.arange(release))
    return mean + (fresh - mean) * float(precision[-1] / precision.sum())


def solve_item_table(total: dict[str, torch.Tensor], alpha: float, reg: float) -> torch.Tensor:
    """The item table from the round's noised sums (post-processing: no further privacy cost).
    The noised Gram is symmetric; reg I keeps the system well posed at the noise levels used."""
    gram = total[GRAM].double()
    lhs = gram + reg * torch.eye(gram.shape[0], dtype=torch.float64)
    return ((1.0 + alpha) * torch.linalg.solve(lhs, total[RHS].double().T).T).float()


def noisy_item_step_delta(
    total: dict[str, torch.Tensor], item_state: dict[str, torch.Tensor], alpha: float, reg: float
) -> dict[str, torch.Tensor]:
    """The server step that lands the id table on the solution (fedavg at lr 1, as the exact step)."""
    return {TABLE: solve_item_table(total, alpha, reg) - item_state[TABLE]}
