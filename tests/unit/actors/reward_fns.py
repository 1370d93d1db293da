"""Reward functions loaded by path in tests: ones that misbehave on purpose."""

import ctypes
import os
import time

from shuffle_r1.rewards import RewardInput, RewardResult


def raises(response: str, reference_answer: str, **_: object) -> RewardResult:
    if "boom" in response:
        raise RuntimeError("reward function exploded on purpose")
    return RewardResult(1.0, 1.0, 0.0)


def hangs(response: str, reference_answer: str, **_: object) -> RewardResult:
    if "hang" in response:
        time.sleep(3600)
    return RewardResult(0.5, 0.0, 1.0)


def returns_float(response: str, reference_answer: str, **_: object) -> float:
    return 0.25


def returns_nan(response: str, reference_answer: str, **_: object) -> float:
    return float("nan")


def slow_exact(response: str, reference_answer: str, **_: object) -> RewardResult:
    """1.0 when the response is the answer, after 0.4 s: a call that can be killed mid-way."""
    time.sleep(0.4)
    score = float(response == reference_answer)
    return RewardResult(score, score, 0.0)


def exits(response: str, reference_answer: str, **_: object) -> RewardResult:
    """Ends its process with ``os._exit(3)`` on "exit", with a segfault on "segv"."""
    if response == "exit":
        os._exit(3)
    if response == "segv":
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    return RewardResult(1.0, 1.0, 0.0)


def returns_unpicklable(response: str, reference_answer: str, **_: object) -> object:
    return lambda: 0.0


def counts_calls(response: str, reference_answer: str, **_: object) -> float:
    """How many calls this process has made (the module is imported once per process)."""
    _calls.append(response)
    return float(len(_calls))


def sleeps(response: str, reference_answer: str, **_: object) -> float:
    """Sleeps ``float(response)`` seconds, then returns this process's id."""
    time.sleep(float(response))
    return float(os.getpid())


_calls: list[str] = []


def echoes_record(record: RewardInput) -> dict[str, float]:
    """Named scores read from every field of the record it takes: what arrived, in numbers."""
    return {
        "prompt_chars": float(len(record.prompt)),
        "level": float(record.row.get("level", -1)),
        "images": float(record.num_images),
        "exact": float(record.response.strip() == record.reference_answer),
    }
