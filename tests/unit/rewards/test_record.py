"""The reward API (shuffle_r1.rewards.record): which call a function gets, what its return
value means, and how several combine, with the real math reward on real GSM8K answers."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from shuffle_r1.rewards import (
    RewardInput,
    RewardResult,
    call_reward,
    combine,
    math_reward,
    named_scores,
    takes_record,
)
from tests.unit.actors.reward_fns import echoes_record, raises

ROOT = Path(__file__).resolve().parents[3]


def gsm8k_row() -> tuple[str, str]:
    row = json.loads((ROOT / "data/gsm8k/test.jsonl").read_text().splitlines()[0])
    return row["question"], row["answer"].rsplit("####", 1)[1].strip()


def test_a_parameter_typed_or_named_for_the_record_takes_it_anything_else_the_legacy_call() -> None:
    def record_kw(record: Any, **_: object) -> float:
        return 0.0

    def typed(x: RewardInput, scale: float = 1.0) -> float:
        return 0.0

    def untyped(x):  # type: ignore[no-untyped-def]
        return 0.0

    def legacy_kw(response: str, reference_answer: str, **_: object) -> float:
        return 0.0

    def optional_second(response: str, reference_answer: str = "") -> float:
        return 0.0

    assert takes_record(echoes_record) and takes_record(record_kw) and takes_record(typed)
    assert not takes_record(math_reward) and not takes_record(legacy_kw)
    assert not takes_record(raises) and not takes_record(optional_second)
    assert not takes_record(untyped) and not takes_record(json.loads)  # one parameter, not ours


def test_call_reward_gives_each_style_its_call() -> None:
    question, answer = gsm8k_row()
    record = RewardInput(
        f"<think>x</think> \\boxed{{{answer}}}", answer, question, {"level": 3}, num_images=0
    )
    assert call_reward(echoes_record, record) == {
        "prompt_chars": float(len(question)),
        "level": 3.0,
        "images": 0.0,
        "exact": 0.0,
    }
    legacy = call_reward(math_reward, record, accuracy_weight=0.5, format_weight=0.5)
    assert legacy == RewardResult(1.0, 1.0, 1.0)
    assert pickle.loads(pickle.dumps(record)) == record  # it crosses Ray and the process pipe


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.25, (0.25, {}, None)),
        (2, (2.0, {}, None)),
        ({"a": 0.5, "b": 1}, (1.5, {"a": 0.5, "b": 1.0}, None)),
        (RewardResult(0.1, 0.0, 1.0, "timeout: x"), (0.1, {"accuracy": 0.0, "format": 1.0},
                                                      "timeout: x")),
    ],
)  # fmt: skip
def test_named_scores_of_each_return_type(value: Any, expected: tuple) -> None:
    assert named_scores(value) == expected


@pytest.mark.parametrize(
    ("value", "error", "fragment"),
    [
        ("1.0", TypeError, "returned str"),
        (True, TypeError, "returned bool"),
        (None, TypeError, "returned NoneType"),
        (float("nan"), ValueError, "non-finite reward"),
        ({"a": float("inf")}, ValueError, "non-finite score 'a'"),
        ({"a": "1"}, TypeError, "'a' = str"),
        ({1: 1.0}, TypeError, "named 1"),
        ({"mean": 1.0}, ValueError, "not ['mean', 'errors']"),
        ({"bad name": 1.0}, ValueError, "named 'bad name'"),
        ({f"s{i}": 0.0 for i in range(17)}, ValueError, "at most 16"),
    ],
)
def test_named_scores_refuses_garbage(value: Any, error: type, fragment: str) -> None:
    with pytest.raises(error, match=None) as caught:
        named_scores(value)
    assert fragment in str(caught.value)


def test_combine_adds_weighted_totals_and_keeps_every_named_score() -> None:
    question, answer = gsm8k_row()
    record = RewardInput(f"<think>x</think> \\boxed{{{answer}}}", answer, question)
    result = combine(
        [
            (1.0, math_reward(record.response, answer), None),  # 0.9 + 0.1
            (0.5, {"brevity": 0.4, "exact": 0.0}, None),
            (-2.0, 0.25, None),
        ]
    )
    assert result.reward == pytest.approx(1.0 + 0.5 * 0.4 - 0.5)
    assert (result.accuracy, result.format, result.error) == (1.0, 1.0, None)
    assert result.scores == {"accuracy": 1.0, "format": 1.0, "brevity": 0.4, "exact": 0.0}


def test_a_failed_or_garbage_function_adds_zero_and_its_error() -> None:
    result = combine([(1.0, {"style": 0.5}, None), (1.0, None, "hung: no answer in 7.0 s")])
    assert (result.reward, result.error, result.scores) == (0.5, "hung: no answer in 7.0 s",
                                                           {"style": 0.5})  # fmt: skip
    garbage = combine([(1.0, float("nan"), None)])
    assert (garbage.reward, garbage.accuracy) == (0.0, 0.0)
    assert (garbage.error or "").startswith("raised: returned a non-finite reward")
    twice = combine([(1.0, {"x": 1.0}, None), (1.0, {"x": 0.0}, None)])
    assert twice.scores == {"x": 1.0} and "named 'x'" in (twice.error or "")


def test_a_plain_float_is_still_its_own_accuracy() -> None:
    assert combine([(1.0, 0.25, None)]) == RewardResult(0.25, 0.25, 0.0)
    assert combine([(1.0, {"style": 0.25}, None)]).accuracy == 0.0  # named, none is accuracy
