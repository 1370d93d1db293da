"""Verifiable rewards (docs/algorithm.md §6). The default is :func:`math_reward`; the config names a
reward function as ``"module:function"`` (``reward.function``), loaded by :func:`load_reward_fn`
and run by the reward workers in a :class:`RewardProcessPool` under a hard deadline."""

from shuffle_r1.rewards.isolation import CallOutcome, RewardProcessPool
from shuffle_r1.rewards.loader import load_reward_fn
from shuffle_r1.rewards.math import (
    RewardFn,
    RewardResult,
    accuracy_reward,
    equivalent,
    extract_last_boxed,
    format_reward,
    last_number,
    math_reward,
    math_reward_last_number_fallback,
)

__all__ = [
    "CallOutcome",
    "RewardFn",
    "RewardProcessPool",
    "RewardResult",
    "accuracy_reward",
    "equivalent",
    "extract_last_boxed",
    "format_reward",
    "last_number",
    "load_reward_fn",
    "math_reward",
    "math_reward_last_number_fallback",
]
