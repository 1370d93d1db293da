"""Reward functions for the fault tests, loaded by path in the reward workers.

``hangs_on_answers_ending_in_<d>`` (d = 0..9): the share of distinct characters of the
response (a reward with variance on a random model's output), after 100 ms of CPU work; for a
reference answer that ends in the digit ``d`` it hangs for an hour instead.
"""

import time

from shuffle_r1.rewards import RewardResult


def _hangs_on(digit: str):  # type: ignore[no-untyped-def]
    def reward(response: str, reference_answer: str, **_: object) -> RewardResult:
        if reference_answer.endswith(digit):
            time.sleep(3600)
        deadline = time.thread_time() + 0.1
        while time.thread_time() < deadline:  # busy, so a test sees this worker working
            pass
        share = len(set(response)) / max(len(response), 1)
        return RewardResult(reward=share, accuracy=0.0, format=0.0)

    return reward


for _d in "0123456789":
    globals()[f"hangs_on_answers_ending_in_{_d}"] = _hangs_on(_d)
