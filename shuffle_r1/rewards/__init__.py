"""Verifiable rewards (docs/algorithm.md §6). The default is :func:`math_reward`; the config names a
reward function as ``"module:function"`` (``reward.function``, or several with weights in
``reward.functions``), loaded by :func:`load_reward_fn` and run by the reward workers in a
:class:`RewardProcessPool` under a hard deadline. A function takes a :class:`RewardInput` or
the legacy ``(response, reference_answer, ...)`` (:func:`takes_record`) and returns a float, a
dict of named scores or a :class:`RewardResult` (:mod:`shuffle_r1.rewards.record`)."""

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
from shuffle_r1.rewards.record import RewardInput, call_reward, combine, named_scores, takes_record

__all__ = [
    "CallOutcome",
    "RewardFn",
    "RewardInput",
    "RewardProcessPool",
    "RewardResult",
    "accuracy_reward",
    "call_reward",
    "combine",
    "equivalent",
    "extract_last_boxed",
    "format_reward",
    "last_number",
    "load_reward_fn",
    "math_reward",
    "math_reward_last_number_fallback",
    "named_scores",
    "takes_record",
]
