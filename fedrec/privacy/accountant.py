"""How much noise a privacy budget needs, and how much budget a schedule spends (Opacus's accountants).

`privacy.accountant` picks Opacus's PRV accountant (the default: numerical composition of privacy
loss distributions, Gopi et al. 2021; its epsilon is the certified upper bound of its estimate) or
its RDP accountant. RDP's conversion to (epsilon, delta) is loose: for DP-ALS's three full-batch
Gaussian releases at epsilon 8 it overstates the epsilon by 7% (8.55 for a noise multiplier of
1.045, whose exact epsilon is 7.95; PRV says 7.96), so the same budget buys 6% less noise with PRV.

A merchant's customers are disjoint from every other merchant's, and each merchant noises its
own update, so one customer's guarantee is the composition of their own merchant's steps:
(rounds the merchant joined) x (local epochs) x (steps per epoch), each a Poisson-subsampled
Gaussian mechanism with the same sampling rate and that round's noise multiplier (the same every
round unless `privacy.noise_decay` schedules it). We count every round for
every merchant (the worst case when `federation.fraction` < 1).

With the noise split across merchants (`privacy.noise_split` = n), a round is one step: the sum
over merchants of their customers' clipped gradients plus n noise shares, one Gaussian mechanism
per round on the customers of every merchant at once (each customer is in one merchant's sum).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedrec.errors import ConfigError
from fedrec.privacy.config import PrivacyConfig

# PRV sizes its grid from RDP's epsilon, so a huge one (a tiny noise multiplier: the late rounds of a
# decaying schedule, or a hand-set noise) asks for terabytes, and near this size it already answers inf
# (3 releases at noise 0.05: RDP 772); past this, RDP's bound (looser, and still certified) is the
# answer, as no budget worth the name is that large.
PRV_MAX_EPSILON = 500.0
# A noise schedule gives every round its own entry in the accountant's history, and both accountants'
# cost grows with their number (planning 20 subsampled rounds: under a minute with PRV; 200: minutes
# with either), as the noise search asks for some 20 epsilons.
MAX_SCHEDULE_ROUNDS = 20
# Opacus's default orders plus larger ones: small budgets with many steps are tightest there.
ALPHAS: list[float] = RDPAccountant.DEFAULT_ALPHAS + list(range(64, 256, 8)) + [256, 512, 1024]


@dataclass(frozen=True)
class DPMechanism:
    """What a merchant's private step needs: resolved once per run, the same for every merchant."""

    clip: float
    noise_multiplier: float
    sample_rate: float
    steps_per_round: int  # local epochs x steps per epoch
    delta: float
    target_epsilon: float  # inf when the noise multiplier was set by hand with no budget
    noise_split: int = 0  # > 0: each merchant adds 1 / sqrt(noise_split) of the noise (one step a round)
    mechanism: str = "dp_sgd"  # or "als": one noised release of the item step's sums a round (noisy_als)
    max_purchases: float = 0.0  # als: the purchase-weight bound (`noisy_als.purchase_weights`)
    count_share: float = 0.0  # als: the merchant's counts' share of the sensitivity (0: no counts block)
    count_weight: float = 0.0  # als with counts: the item bias's weight on log(1 + count)
    accountant: str = "prv"  # Opacus's "prv" or "rdp" (`privacy.accountant`)
    noise_decay: float = 1.0  # the schedule: round t's noise multiplier is noise_multiplier x decay^(t - 1)

    def noise_at(self, rnd: int) -> float:
        """Round `rnd`'s (1-based) noise multiplier under the schedule."""
        return self.noise_multiplier * self.noise_decay ** (rnd - 1)

    def at_round(self, rnd: int) -> DPMechanism:
        """What round `rnd` runs: its noise multiplier is that round's (`noise_decay` is kept, for
        DP-ALS's count averaging; do not resolve a resolved mechanism again)."""
        return self if self.noise_decay == 1 else dataclasses.replace(self, noise_multiplier=self.noise_at(rnd))

    @property
    def share_multiplier(self) -> float:
        """The noise one merchant adds per unit of sensitivity: all of it, or its share of the split."""
        return self.noise_multiplier / math.sqrt(max(1, self.noise_split))

    @property
    def share_std(self) -> float:
        """The noise standard deviation one merchant adds to a sum of gradients clipped to `clip`."""
        return self.share_multiplier * self.clip

    def to_dict(self) -> dict:
        return {
            "clip": self.clip,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps_per_round": self.steps_per_round,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon if math.isfinite(self.target_epsilon) else "inf",
            "noise_split": self.noise_split,
            "mechanism": self.mechanism,
            **({"max_purchases": self.max_purchases} if self.mechanism == "als" else {}),
            **({"count_share": self.count_share, "count_weight": self.count_weight} if self.count_share else {}),
            **({"noise_decay": self.noise_decay} if self.noise_decay != 1 else {}),
        }


def steps_per_epoch(sample_rate: float) -> int:
    """Poisson batches of expected size q * customers: 1 / q of them make one epoch."""
    return max(1, math.ceil(1.0 / sample_rate))


def epsilon_spent(mech: DPMechanism, rounds: int) -> float:
    """Epsilon at `mech.delta` after `rounds` rounds (0 rounds: nothing released yet)."""
    if rounds <= 0:
        return 0.0
    if mech.noise_multiplier <= 0:
        return math.inf
    return _epsilon(mech.accountant, _history(mech, rounds), mech.delta)


def _history(mech: DPMechanism, rounds: int) -> list[tuple[float, float, int]]:
    """Opacus's accountant history of the first `rounds` rounds: (noise multiplier, sample rate, steps)
    per noise level, so one entry without a schedule and one per round with it."""
    if mech.noise_decay == 1:
        return [(mech.noise_multiplier, mech.sample_rate, rounds * mech.steps_per_round)]
    return [(mech.noise_at(t), mech.sample_rate, mech.steps_per_round) for t in range(1, rounds + 1)]


def _epsilon(accountant: str, history: list[tuple[float, float, int]], delta: float) -> float:
    """One accountant's epsilon for a history of Poisson-subsampled Gaussian steps (sample_rate 1: none)."""
    if accountant == "prv" and (rdp := _epsilon("rdp", history, delta)) > PRV_MAX_EPSILON:
        return rdp
    acc = create_accountant(mechanism=accountant)
    acc.history = history
    with _quiet_opacus():
        return float(acc.get_epsilon(delta=delta, **_epsilon_kwargs(accountant)))


def _epsilon_kwargs(accountant: str) -> dict:
    """RDP's epsilon is tightest over our wider set of orders; PRV takes its own defaults."""
    return {"alphas": ALPHAS} if accountant == "rdp" else {}


@contextlib.contextmanager
def _quiet_opacus() -> Iterator[None]:
    """Opacus's PRV takes log(0) at sample_rate 1 on a branch it then discards, and RDP (also inside
    PRV, to size its domain) warns when its largest order is the best: neither touches the epsilon."""
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.filterwarnings("ignore", "Optimal order is the largest alpha", UserWarning)
        yield


def rounds_within_budget(mech: DPMechanism, rounds: int) -> int:
    """The most rounds (at most `rounds`) whose spent epsilon stays within the target."""
    if not math.isfinite(mech.target_epsilon):
        return rounds
    lo, hi = 0, rounds  # epsilon grows with rounds: binary search the last round that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if epsilon_spent(mech, mid) <= mech.target_epsilon:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_mechanism(cfg: PrivacyConfig, rounds: int, epochs: int) -> DPMechanism | None:
    """The mechanism for a run, or None when privacy is off.

    With only a budget, the noise multiplier (round 1's, under a `noise_decay` schedule) is the
    smallest that keeps the whole schedule (rounds x epochs x 1/q steps) within it. With a noise
    multiplier set by hand, the run refuses to start when not even one round fits the budget
    (training then stops when it is spent).
    """
    if not cfg.enabled:
        return None
    als = cfg.mechanism == "als"  # one release of every customer's bounded terms a round: no sampling
    sample_rate = 1.0 if als else cfg.sample_rate
    per_round = 1 if cfg.noise_split or als else epochs * steps_per_epoch(cfg.sample_rate)
    if cfg.noise_decay != 1 and rounds > MAX_SCHEDULE_ROUNDS:
        raise ConfigError(
            f"privacy: a noise schedule (noise_decay={cfg.noise_decay}) is accounted round by round, which takes "
            f"minutes past {MAX_SCHEDULE_ROUNDS} rounds ({rounds} here): set privacy.noise_decay = 1 or at most "
            f"{MAX_SCHEDULE_ROUNDS} federation.rounds"
        )
    sigma = cfg.noise_multiplier
    if sigma <= 0:
        try:
            sigma = _noise_for(cfg, sample_rate, per_round, rounds)
        except ValueError as exc:
            raise ConfigError(
                f"privacy: epsilon={cfg.epsilon} at delta={cfg.delta} cannot be met by {rounds} rounds "
                f"x {per_round} steps at sample_rate={sample_rate} ({exc})"
            ) from None
    mech = DPMechanism(
        cfg.clip, sigma, sample_rate, per_round, cfg.delta, cfg.epsilon, cfg.noise_split, cfg.mechanism,
        cfg.max_purchases if als else 0.0, cfg.count_share if als else 0.0,
        cfg.count_weight if als and cfg.count_share else 0.0, cfg.accountant, cfg.noise_decay,
    )  # fmt: skip
    if math.isfinite(cfg.epsilon) and rounds_within_budget(mech, 1) < 1:
        raise ConfigError(
            f"privacy: noise_multiplier={sigma} spends {epsilon_spent(mech, 1):.3g} > epsilon={cfg.epsilon} "
            f"in the first round alone; raise privacy.noise_multiplier"
            + ("" if als else " or lower privacy.sample_rate")
        )
    return mech


def _noise_for(cfg: PrivacyConfig, sample_rate: float, per_round: int, rounds: int) -> float:
    """The smallest noise multiplier (round 1's; to 0.5% of epsilon) whose schedule stays within the
    budget: Opacus's own search for one noise level, and the same search (double, then bisect) over
    the per-round history for a decaying schedule, which Opacus's search does not take."""
    tolerance = 0.005 * cfg.epsilon
    if cfg.noise_decay == 1:
        with _quiet_opacus():
            return float(
                get_noise_multiplier(
                    target_epsilon=cfg.epsilon,
                    target_delta=cfg.delta,
                    sample_rate=sample_rate,
                    steps=rounds * per_round,
                    accountant=cfg.accountant,
                    epsilon_tolerance=tolerance,
                    **_epsilon_kwargs(cfg.accountant),
                )
            )

    def spent(sigma: float) -> float:
        mech = DPMechanism(1.0, sigma, sample_rate, per_round, cfg.delta, cfg.epsilon, accountant=cfg.accountant,
                           noise_decay=cfg.noise_decay)  # fmt: skip
        return epsilon_spent(mech, rounds)

    low, high = 0.0, 10.0
    while spent(high) > cfg.epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError("no noise multiplier up to 10,000 meets it")
    while cfg.epsilon - spent(high) > tolerance:
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) > cfg.epsilon else (low, mid)
    return high


def privacy_entry(mech: DPMechanism | None, rounds: int) -> dict | None:
    """The model card's `differential_privacy` entry: the mechanism and the epsilon spent."""
    if mech is None:
        return None
    spent = epsilon_spent(mech, rounds)
    name = f"opacus {mech.accountant.upper()}"
    if mech.mechanism == "als":
        how = "(Gaussian mechanism, no subsampling), one release of the item step's sums a round"
        how += ", on the sum over merchants" if mech.noise_split else ""
    elif mech.noise_split:
        how = "(Poisson-subsampled Gaussian), one step a round on the sum over merchants"
    else:
        how = "(Poisson-subsampled Gaussian), every round counted for every merchant"
    entry = {
        **mech.to_dict(),
        **({"last_noise_multiplier": mech.noise_at(rounds)} if mech.noise_decay != 1 else {}),
        "rounds": rounds,
        "epsilon": spent if math.isfinite(spent) else "inf",
        "accountant": f"{name} {how}",
        "unit": "one customer's whole purchase history at one merchant",
    }
    if mech.noise_split:
        entry["trust"] = (
            "certified for what the secure sum releases: the coordinator sees only the sum (SecAgg+), and no "
            "merchant pools its own noise share with the coordinator"
        )
        entry["epsilon_if_other_merchants_collude"] = _as_json(epsilon_spent(colluded(mech), rounds))
    return entry


def colluded(mech: DPMechanism) -> DPMechanism:
    """The mechanism a coalition of the coordinator and every other merchant faces: they can subtract
    their own noise shares from the sum, leaving one merchant's share (1 / sqrt(noise_split))."""
    sigma = mech.noise_multiplier / math.sqrt(max(1, mech.noise_split))
    return dataclasses.replace(mech, noise_multiplier=sigma, noise_split=1)


def _as_json(eps: float) -> float | str:
    return eps if math.isfinite(eps) else "inf"
