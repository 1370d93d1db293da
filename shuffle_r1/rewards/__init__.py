"""Verifiable rewards (docs/algorithm.md §6). The default is :func:`math_reward`; the config names a
reward function as ``"module:function"`` (``reward.function``), loaded by :func:`load_reward_fn`."""

from shuffle_r1.rewards.math import (
    MathVerifier,
    RewardFn,
    RewardResult,
    accuracy_reward,
    default_verifier,
    extract_last_boxed,
    format_reward,
    last_number,
    load_reward_fn,
    math_reward,
    math_reward_last_number_fallback,
)

__all__ = [
    "MathVerifier",
    "RewardFn",
    "RewardResult",
    "accuracy_reward",
    "default_verifier",
    "extract_last_boxed",
    "format_reward",
    "last_number",
    "load_reward_fn",
    "math_reward",
    "math_reward_last_number_fallback",
]
