"""The `[privacy]` section of a run config: off unless a budget or a noise level is set."""

from __future__ import annotations

import math
from dataclasses import dataclass

MECHANISMS = ("dp_sgd", "als")
ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class PrivacyConfig:
    # Target (epsilon, delta) per customer over the whole training run; inf = no differential
    # privacy (the default). delta must stay well below 1 / (customers of a merchant).
    epsilon: float = math.inf
    delta: float = 1e-5
    # L2 bound on one customer's gradient of the shared item tower (and of the merchant's item
    # bias, which other customers' recommendations also use), per step. Chosen on validation at
    # epsilon 8 (make validate-privacy): 0.1 beat 1.0 on both datasets. With Adam, a bound below
    # every customer's norm only rescales the step, so what it sets is the share clipped.
    clip: float = 0.1
    # Poisson sampling: each customer joins a step's batch with this probability, independently;
    # 1 / sample_rate steps make one local epoch.
    sample_rate: float = 0.1
    # 0: solved from the budget and the schedule. > 0: used as is, and training stops when the
    # budget is spent.
    noise_multiplier: float = 0.0
    # Distributed DP (under secure aggregation). 0: each merchant's upload is private on its own
    # (local DP-SGD, several noisy steps a round). n >= 1: one DP-SGD step a round, whose noise is
    # split into n shares: each merchant adds 1/sqrt(n) of it to its clipped gradient sum, so the
    # sum over n merchants carries the full noise. It is certified only for the sum, so only
    # against a coordinator that sees nothing but the sum (SecAgg+) and merchants that do not
    # pool their noise with it; every round must hold at least n merchants, and the coordinator's
    # optimiser takes the step (an adaptive one: federation.server.name = fedadam).
    noise_split: int = 0
    # "dp_sgd": noisy local steps on the softmax loss (above). "als": ALS's item step from clipped,
    # noised sums (`fedrec/privacy/noisy_als.py`; local.loss = 'ials', local.ials_item_step =
    # 'exact'), one Gaussian release a round, no subsampling: `clip` bounds each customer's user
    # vector and `sample_rate` is unused.
    mechanism: str = "dp_sgd"
    # als only: each customer's purchases weigh min(1, sqrt(max_purchases / n)), bounding their part
    # of the per-product sums by clip x sqrt(max_purchases) however much they bought.
    max_purchases: float = 2.0
    # als with model.merchant_item_bias only: the share of each round's squared sensitivity given to
    # the merchant's own weighted buyer counts (`noisy_als.COUNTS`), whose noised value sets its item
    # bias, count_weight x log(1 + count); 0: no counts block (needs merchant_item_bias off).
    count_share: float = 0.0
    count_weight: float = 0.1
    # The noise schedule: round t's noise multiplier is round 1's times noise_decay^(t - 1), round 1's
    # solved so that the whole schedule meets the budget (1: the same noise every round). Below 1,
    # later rounds, whose releases the final model rests on most, get less noise and earlier ones more.
    # Accounted round by round, so refused past 20 rounds. Tuned on validation for DP-ALS at 3 to 6
    # rounds (make validate-privacy-noise-decay, confirm-privacy-noise-decay): no decay led the
    # shipped flat schedule beyond the seed spread on fresh seeds, and per-merchant DP-SGD on MovieLens
    # lost by it (make validate-privacy-noise-decay-sgd), so 1 stays.
    noise_decay: float = 1.0
    # Opacus's accountant for the noise a budget needs and the epsilon spent: "prv" (privacy loss
    # distributions composed numerically; tight) or "rdp" (Renyi DP; looser: the same budget buys
    # about 6% more noise at epsilon 8). Runs before 2026-12-06 used "rdp".
    accountant: str = "prv"

    @property
    def enabled(self) -> bool:
        return math.isfinite(self.epsilon) or self.noise_multiplier > 0


def privacy_errors(cfg: PrivacyConfig) -> list[str]:
    """Out-of-range settings, each named (the run refuses to start on any of them)."""
    checks = [
        (cfg.epsilon > 0, f"privacy.epsilon must be > 0 (inf turns privacy off), got {cfg.epsilon}"),
        (0 < cfg.delta < 1, f"privacy.delta must be in (0, 1), got {cfg.delta}"),
        (cfg.noise_multiplier >= 0, f"privacy.noise_multiplier must be >= 0, got {cfg.noise_multiplier}"),
        (cfg.clip > 0, f"privacy.clip must be > 0, got {cfg.clip}"),
        (0 < cfg.sample_rate <= 1, f"privacy.sample_rate must be in (0, 1], got {cfg.sample_rate}"),
        (cfg.noise_split >= 0, f"privacy.noise_split must be >= 0 (0: no split), got {cfg.noise_split}"),
        (
            cfg.mechanism in MECHANISMS,
            f"privacy.mechanism must be one of {', '.join(MECHANISMS)}, got {cfg.mechanism!r}",
        ),
        (
            cfg.accountant in ACCOUNTANTS,
            f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}, got {cfg.accountant!r}",
        ),
        (
            0 < cfg.noise_decay <= 2,
            f"privacy.noise_decay must be in (0, 2] (1: the same noise every round), got {cfg.noise_decay}",
        ),
        (cfg.max_purchases > 0, f"privacy.max_purchases must be > 0, got {cfg.max_purchases}"),
        (0 <= cfg.count_share < 1, f"privacy.count_share must be in [0, 1), got {cfg.count_share}"),
        (cfg.count_weight > 0, f"privacy.count_weight must be > 0, got {cfg.count_weight}"),
    ]
    return [msg for ok, msg in checks if not ok]
