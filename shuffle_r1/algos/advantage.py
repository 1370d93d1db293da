"""GRPO advantage: each rollout's reward as a z-score within its group (docs/algorithm.md §1)."""

from __future__ import annotations

import torch
from torch import Tensor


def grpo_advantages(rewards: Tensor, eps: float = 1e-6) -> Tensor:
    """Group-normalised advantages, ``A[g, j] = (r[g, j] - mean_g) / (std_g + eps)`` (§1).

    Args:
        rewards: ``(G, n)`` scalar reward of rollout ``j`` of group ``g`` (reward units).
            Integer or bool rewards are converted to the default float dtype.
        eps: added to the standard deviation so an all-equal group gives ``A = 0``.

    Returns:
        ``(G, n)`` advantages (dimensionless), same float dtype as ``rewards``. The std is
        the unbiased (n - 1) estimate; a group of size 1 uses mean 0 and std 1, as in the
        reference, so its advantage is ``r / (1 + eps)``. Every token of a rollout is later
        given its rollout's advantage. A group whose rewards are all equal gets exactly 0
        (§2.5): float rounding of its mean (16 × 0.7 in float32) would otherwise leave a
        spurious std of ~1e-8 and ``|A|`` of ~0.06 instead of 0.

    Raises:
        ValueError: ``rewards`` is not 2-D, has groups of size 0, or holds NaN/inf.
    """
    if rewards.dim() != 2 or rewards.shape[1] == 0:
        raise ValueError(
            f"rewards must have shape (groups, group_size) with group_size >= 1, "
            f"got {tuple(rewards.shape)}"
        )
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    bad = (~torch.isfinite(rewards)).nonzero()
    if bad.numel():
        g, j = bad[0].tolist()
        raise ValueError(f"reward of group {g}, rollout {j} is {rewards[g, j].item()}")
    if rewards.shape[1] == 1:
        return rewards / (1.0 + eps)
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, unbiased=True, keepdim=True)
    all_equal = (rewards == rewards[:, :1]).all(dim=1, keepdim=True)
    return torch.where(all_equal, 0.0, (rewards - mean) / (std + eps))
