"""The paper's two pathologies as step metrics: rollout silence, advantage collapse (§5).

Ratios over an empty set of rollouts are NaN (no rollouts, nothing to measure), not an
error, so a skipped step still logs a row.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_rollouts(advantages: Tensor, truncated: Tensor | None = None) -> None:
    if advantages.dim() != 1:
        raise ValueError(f"advantages must have shape (rollouts,), got {tuple(advantages.shape)}")
    if truncated is not None and tuple(truncated.shape) != tuple(advantages.shape):
        raise ValueError(
            f"truncated has shape {tuple(truncated.shape)}, "
            f"advantages has {tuple(advantages.shape)}"
        )


def nonzero_gradient_share(advantages: Tensor, truncated: Tensor) -> float:
    """Share of rollouts that contribute a gradient (§5, rollout silence).

    A rollout is silent if its advantage is exactly 0, or negative while its response was
    cut at the length limit; otherwise it contributes.

    Args:
        advantages: ``(N,)`` advantage of each rollout trained on.
        truncated: ``(N,)`` bool, the response hit the maximum response length.

    Returns:
        Share in [0, 1]; NaN if N = 0.

    Raises:
        ValueError: ``advantages`` is not 1-D or the shapes differ.
    """
    _check_rollouts(advantages, truncated)
    if advantages.numel() == 0:
        return float("nan")
    silent = (advantages == 0) | ((advantages < 0) & truncated.bool())
    return 1.0 - silent.float().mean().item()


def rollout_silence_ratio(advantages: Tensor, truncated: Tensor) -> float:
    """``1 - nonzero_gradient_share``: share of rollouts without a gradient (§5); NaN if N = 0.

    Shapes and errors as :func:`nonzero_gradient_share`.
    """
    return 1.0 - nonzero_gradient_share(advantages, truncated)


def advantage_collapse_share(advantages: Tensor, tau: float = 0.1) -> float:
    """Share of rollouts with ``|A| < tau`` (§5, advantage collapse).

    Args:
        advantages: ``(N,)`` advantages (dimensionless z-scores).
        tau: threshold > 0.

    Returns:
        Share in [0, 1]; NaN if N = 0.

    Raises:
        ValueError: ``advantages`` is not 1-D or ``tau`` <= 0.
    """
    _check_rollouts(advantages)
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if advantages.numel() == 0:
        return float("nan")
    return (advantages.abs() < tau).float().mean().item()


def advantage_histogram(
    advantages: Tensor, bins: int = 24, range: tuple[float, float] = (-3.0, 3.0)
) -> tuple[Tensor, Tensor]:
    """Histogram of advantages in equal-width bins over ``range`` (§5).

    Values outside ``range`` are counted in the first or last bin, so the counts always sum
    to N (a z-score in a group of 16 can reach ±3.75).

    Args:
        advantages: ``(N,)`` advantages.
        bins: number of bins, ≥ 1.
        range: ``(low, high)``, low < high.

    Returns:
        ``counts`` ``(bins,)`` long and ``edges`` ``(bins + 1,)`` float64.

    Raises:
        ValueError: ``advantages`` is not 1-D, ``bins`` < 1 or ``range`` is empty.
    """
    _check_rollouts(advantages)
    low, high = range
    if bins < 1 or not low < high:
        raise ValueError(f"need bins >= 1 and range low < high, got bins={bins}, range={range}")
    edges = torch.linspace(low, high, bins + 1, dtype=torch.float64)
    values = advantages.detach().to(torch.float64).cpu()
    # bucketize(right=True) gives 1 + the bin a value falls in; the last bin is closed.
    index = (torch.bucketize(values, edges, right=True) - 1).clamp(0, bins - 1)
    return torch.bincount(index, minlength=bins), edges
