"""A reward with variance on a random tiny model's output, so PTS/ABS have pairs to draw.

math_reward is 0 for every rollout of an untrained random model (no group has contrast and
every update would be skipped, as docs/algorithm.md §3 specifies). This one scores the share of
distinct characters in the response, which varies between rollouts of one prompt.
"""

from shuffle_r1.rewards import RewardInput, RewardResult


def distinct_char_share(response: str, reference_answer: str, **_: object) -> RewardResult:
    share = len(set(response)) / max(len(response), 1)
    return RewardResult(reward=share, accuracy=0.0, format=0.0)


def distinct_char_share_some_raise(
    response: str, reference_answer: str, **_: object
) -> RewardResult:
    """As :func:`distinct_char_share`, but raises for about a quarter of the responses
    (deterministic in the response), so the reward workers count errors."""
    if sum(map(ord, response)) % 4 == 0:
        raise RuntimeError("this reward function raises on purpose")
    return distinct_char_share(response, reference_answer)


def prompt_chars(record: RewardInput) -> dict[str, float]:
    """The prompt's length as a named score: proves the rendered prompt reached the reward."""
    return {"prompt_chars": float(len(record.prompt))}
