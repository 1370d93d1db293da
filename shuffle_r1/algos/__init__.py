"""The Shuffle-R1 algorithm, one file per step of ``docs/algorithm.md``.

GRPO advantage (§1) → Pairwise Trajectory Sampling (§2) → Advantage-based Batch Shuffle
(§3) → PPO clipped policy loss (§4); rollout-silence and advantage-collapse metrics (§5).
Pure torch: no Ray, Redis or gRPC.
"""

from shuffle_r1.algos.abs import ShuffleResult, abs_round_sizes, advantage_based_batch_shuffle
from shuffle_r1.algos.advantage import grpo_advantages
from shuffle_r1.algos.diagnostics import (
    advantage_collapse_share,
    advantage_histogram,
    nonzero_gradient_share,
    rollout_silence_ratio,
)
from shuffle_r1.algos.loss import (
    KL_TYPES,
    LOSS_AGG_MODES,
    PolicyLossOutput,
    kl_penalty,
    masked_mean,
    policy_loss,
)
from shuffle_r1.algos.pts import PairSelection, pairs_kept, pairwise_trajectory_sampling

__all__ = [
    "KL_TYPES",
    "LOSS_AGG_MODES",
    "PairSelection",
    "PolicyLossOutput",
    "ShuffleResult",
    "abs_round_sizes",
    "advantage_based_batch_shuffle",
    "advantage_collapse_share",
    "advantage_histogram",
    "grpo_advantages",
    "kl_penalty",
    "masked_mean",
    "nonzero_gradient_share",
    "pairs_kept",
    "pairwise_trajectory_sampling",
    "policy_loss",
    "rollout_silence_ratio",
]
