"""Secure groups: a robust rule over group sums, so that it can run under secure aggregation.

A robust rule (`robust.py`) reads each merchant's own update, which secure aggregation hides. Split
each round's merchants at random into `groups` groups and securely sum each group on its own (one
SecAgg+ run per group): the coordinator then sees a handful of sums, each over at least
`MIN_GROUP` merchants, and runs the robust rule over the groups as if each were one merchant
("bucketing", Karimireddy, He and Jaggi, 2022, which averages random buckets before a robust rule;
here the buckets are what secure aggregation leaves visible). A fake merchant then spoils its own
group's sum and no other, which the rule bounds as it would bound the merchant; a coalition
spoils up to one group per member, so the rule holds only while the spoiled groups stay a minority.

What it costs: the coordinator learns each group's sum, a sum over fewer merchants than the
round's (that says more about each of them: README, "Attacks"), and an honest merchant grouped
with a fake one is bounded with it for that round. Groups are drawn anew each round, from the run's
seed and the round alone, so that every runtime draws the same ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from fedrec.errors import ConfigError
from fedrec.federated.aggregation import sum_all

MIN_GROUP = 3  # with 2, each member learns the other's update from their sum
MIN_GROUPS = 3  # a median of 2 is their mean: one spoiled group of 2 moves it half way


def check_groups(merchants_per_round: int, groups: int) -> None:
    """Refuse a grouping the round cannot fill: at least `MIN_GROUPS` groups of `MIN_GROUP` merchants."""
    if groups < MIN_GROUPS:
        raise ConfigError(
            f"federation.robust_groups = {groups}: a robust rule over fewer than {MIN_GROUPS} group sums does not "
            "bound one spoiled group (0 turns grouping off)"
        )
    if merchants_per_round < MIN_GROUP * groups:
        raise ConfigError(
            f"federation.robust_groups = {groups} needs at least {MIN_GROUP * groups} merchants a round "
            f"({MIN_GROUP} a group), but a round has {merchants_per_round}: lower it or raise federation.fraction"
        )


def assign_groups(n: int, groups: int, seed: int, rnd: int) -> list[np.ndarray]:
    """The positions 0..n-1 of a round's merchants split at random into `groups` groups whose sizes
    differ by at most one (pure: the same seed and round give the same groups in every runtime)."""
    check_groups(n, groups)
    order = np.random.default_rng([seed, rnd, 0x5EC]).permutation(n)
    return [np.sort(part) for part in np.array_split(order, groups)]


def group_sums(
    messages: Sequence[Mapping[str, torch.Tensor]], groups: int, seed: int, rnd: int
) -> list[dict[str, torch.Tensor]]:
    """Each group's sum of its merchants' messages: what one secure sum per group shows."""
    return [sum_all(messages[i] for i in idx) for idx in assign_groups(len(messages), groups, seed, rnd)]
