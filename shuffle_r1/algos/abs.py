"""Advantage-based Batch Shuffle: re-draw the kept pairs by importance weight (§3).

Vocabulary: the batch of P kept pairs is drawn from S times ("rounds"); round r draws T_r
pairs without replacement, each pair with probability Φ_p = W_p / Σ W. The draw order is
the training order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ShuffleResult:
    """The re-drawn batch of one step (docs/algorithm.md §3).

    Attributes:
        indices: ``(D,)`` long, pair indices into the step's P pairs in draw order (round
            by round). ``D = P - shortfall``; a pair recurs at most once per round.
        probabilities: ``(P,)`` Φ, the probability each pair is drawn with. Sums to 1,
            except when every weight is 0: then all zeros (no pair can be drawn).
        draw_probabilities: ``(D,)`` ``Φ[indices]``, the probability of each drawn item.
        shortfall: pairs the rounds wanted but could not draw because fewer pairs than
            ``T_r`` had non-zero weight (summed over rounds).
        skipped: the batch is empty (all weights 0, or no pairs), so the step's update is
            skipped.
        round_sizes: pairs each round drew, in order (``sum == D``): ``indices`` is their
            concatenation. ``[P]`` for S = 1; rounds that drew nothing are left out.
            How the learner cuts the rounds into optimizer mini-batches is
            :func:`shuffle_r1.minibatches.abs_minibatch_rows`.
    """

    indices: Tensor
    probabilities: Tensor
    draw_probabilities: Tensor
    shortfall: int
    skipped: bool
    round_sizes: tuple[int, ...] = ()


def abs_round_sizes(num_pairs: int, shuffle_times: int) -> list[int]:
    """T_r, the pairs round r draws: P // S each, one more in the first P mod S rounds (§3.3).

    Raises:
        ValueError: ``num_pairs`` < 0 or ``shuffle_times`` < 1.
    """
    if num_pairs < 0:
        raise ValueError(f"num_pairs must be >= 0, got {num_pairs}")
    if shuffle_times < 1:
        raise ValueError(f"shuffle_times must be >= 1, got {shuffle_times}")
    base, extra = divmod(num_pairs, shuffle_times)
    return [base + (r < extra) for r in range(shuffle_times)]


def advantage_based_batch_shuffle(
    pair_weights: Tensor, shuffle_times: int, generator: torch.Generator | None = None
) -> ShuffleResult:
    """Re-draw the step's P pairs in S rounds, by importance weight, without replacement (§3).

    Φ = W / Σ W over all kept pairs of the step, across prompts. Round r draws T_r pairs
    (:func:`abs_round_sizes`) without replacement by Φ with ``torch.multinomial``; the
    rounds are concatenated in order, so across rounds a pair can recur up to S times and a
    zero-weight pair never appears. Departures from the reference (§3, required):

    - the draw uses ``generator`` (seed it for a reproducible, resumable run);
    - a round that wants more pairs than have non-zero weight draws all of those, and the
      missing count is added to ``shortfall`` (the reference crashes);
    - all weights 0 (with S > 1): nothing is drawn and ``skipped`` is True.

    S = 1 means no re-draw: every pair (zero-weight ones too) in its original order.

    Args:
        pair_weights: ``(P,)`` W_p = |A_1| + |A_2| ≥ 0 (advantage units), all pairs flattened.
        shuffle_times: S ≥ 1.
        generator: torch RNG on ``pair_weights``' device; None uses the global RNG.

    Returns:
        :class:`ShuffleResult`.

    Raises:
        ValueError: ``pair_weights`` is not 1-D floating point, a weight is negative, NaN or
            inf (its index is named), or ``shuffle_times`` < 1.
    """
    if pair_weights.dim() != 1 or not pair_weights.is_floating_point():
        raise ValueError(
            f"pair_weights must be a 1-D float tensor (num_pairs,), "
            f"got shape {tuple(pair_weights.shape)} dtype {pair_weights.dtype}"
        )
    bad = (~torch.isfinite(pair_weights) | (pair_weights < 0)).nonzero()
    if bad.numel():
        p = int(bad[0])
        raise ValueError(
            f"pair weight {p} is {pair_weights[p].item()}; weights must be finite and >= 0"
        )
    sizes = abs_round_sizes(pair_weights.numel(), shuffle_times)

    total = pair_weights.sum()
    probabilities = pair_weights / total if total > 0 else torch.zeros_like(pair_weights)
    if shuffle_times == 1:
        indices = torch.arange(pair_weights.numel(), device=pair_weights.device)
        shortfall = 0
        drawn_sizes = [pair_weights.numel()] if pair_weights.numel() else []
    else:
        drawable = int((pair_weights > 0).sum())
        rounds = [
            torch.multinomial(probabilities, min(t, drawable), generator=generator)
            for t in sizes
            if min(t, drawable) > 0
        ]
        indices = torch.cat(rounds) if rounds else pair_weights.new_zeros(0, dtype=torch.long)
        shortfall = sum(sizes) - indices.numel()
        drawn_sizes = [r.numel() for r in rounds]
    return ShuffleResult(
        indices=indices,
        probabilities=probabilities,
        draw_probabilities=probabilities[indices],
        shortfall=shortfall,
        skipped=indices.numel() == 0,
        round_sizes=tuple(drawn_sizes),
    )
