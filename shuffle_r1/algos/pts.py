"""Pairwise Trajectory Sampling: pair high with low advantage, keep the top contrasts (§2)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from shuffle_r1.limits import PTS_FLOOR_TOLERANCE


@dataclass(frozen=True)
class PairSelection:
    """The pairs PTS keeps, per group (docs/algorithm.md §2, §3.1).

    Attributes:
        pairs: ``(G, M, 2)`` long, ``[high, low]`` rollout indices within the group;
            pair ``i`` joins the i-th highest and the i-th lowest advantage. Pairs are in
            order of decreasing (non-increasing) contrast.
        contrast: ``(G, M)`` ``A_high - A_low`` (≥ 0).
        weights: ``(G, M)`` importance weight ``|A_high| + |A_low|`` that ABS draws by.
    """

    pairs: Tensor
    contrast: Tensor
    weights: Tensor


def pairs_kept(group_size: int, keep_ratio: float) -> int:
    """M = floor(α · n / 2), the number of pairs PTS keeps per group (§2.3).

    Raises:
        ValueError: ``group_size`` is not a positive even number, ``keep_ratio`` is outside
            (0, 1], or the ratio keeps no pair for this group size.
    """
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group size must be a positive even number to pair, got {group_size}")
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    kept = math.floor(keep_ratio * group_size / 2 + PTS_FLOOR_TOLERANCE)
    if kept == 0:
        raise ValueError(
            f"keep_ratio {keep_ratio} keeps no pair for group size {group_size} "
            f"(floor({keep_ratio} * {group_size} / 2) = 0); raise keep_ratio to at least "
            f"{2 / group_size:g} or use larger groups"
        )
    return kept


def pairwise_trajectory_sampling(advantages: Tensor, keep_ratio: float) -> PairSelection:
    """Pair each group's rollouts by advantage rank and keep the M largest contrasts (§2).

    1. sort the group by advantage, descending and stable (ties keep rollout order);
    2. pair the i-th highest with the i-th lowest, i = 1 … n/2;
    3. keep the first M = floor(α · n/2) pairs.
    Advantages are not recomputed: the caller keeps the full-group z-scores (§2.4). A group
    of equal rewards (A = 0) is paired and kept like any other, with weight 0 (§2.5).

    Args:
        advantages: ``(G, n)`` GRPO advantages, n even.
        keep_ratio: α in (0, 1], the share of pairs kept.

    Returns:
        :class:`PairSelection` with ``M = floor(α · n / 2)`` pairs per group.

    Raises:
        ValueError: ``advantages`` is not ``(G, n)`` with n even, holds NaN/inf, or α is
            outside (0, 1] or keeps no pair.
    """
    if advantages.dim() != 2 or advantages.shape[1] % 2 or advantages.shape[1] == 0:
        raise ValueError(
            f"advantages must have shape (groups, n) with n even, got {tuple(advantages.shape)}"
        )
    n = advantages.shape[1]
    kept = pairs_kept(n, keep_ratio)
    bad = (~torch.isfinite(advantages)).nonzero()
    if bad.numel():
        g, j = bad[0].tolist()
        raise ValueError(f"advantage of group {g}, rollout {j} is {advantages[g, j].item()}")

    order = torch.sort(advantages, dim=1, descending=True, stable=True).indices
    high = order[:, :kept]
    low = order.flip(1)[:, :kept]
    a_high = advantages.gather(1, high)
    a_low = advantages.gather(1, low)
    return PairSelection(
        pairs=torch.stack([high, low], dim=-1),
        contrast=a_high - a_low,
        weights=a_high.abs() + a_low.abs(),
    )
