"""The math reward (docs/algorithm.md §6) on real GSM8K answers, LaTeX equivalences and timeouts.

The deadline from any thread, through the reward workers' processes, is in test_isolation.py."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import pytest

from shuffle_r1.rewards import (
    RewardResult,
    accuracy_reward,
    equivalent,
    extract_last_boxed,
    format_reward,
    math_reward,
)

GSM8K_TEST = Path(__file__).resolve().parents[3] / "data" / "gsm8k" / "test.jsonl"
# An answer whose comparison with "1" does not finish (sympy evaluates the power tower).
HANGING_ANSWER = "9^{9^{9^{9}}}"


def gsm8k_golds(n: int) -> list[str]:
    """The final answers of the first n GSM8K test problems, as the data loader reads them."""
    with GSM8K_TEST.open() as f:
        rows = [json.loads(next(f)) for _ in range(n)]
    return [row["answer"].rsplit("####", 1)[1].strip().replace(",", "") for row in rows]


@pytest.fixture(scope="module")
def golds() -> list[str]:
    return gsm8k_golds(50)


def test_gsm8k_correct_boxed_answer_scores_one(golds: list[str]) -> None:
    for gold in golds:
        response = f"<think>Let me compute step by step.</think> The answer is \\boxed{{{gold}}}."
        assert math_reward(response, gold) == RewardResult(1.0, 1.0, 1.0, None), gold


def test_gsm8k_wrong_number_scores_format_only(golds: list[str]) -> None:
    for gold in golds:
        wrong = str(int(float(gold)) + 1)
        response = f"<think>Hmm.</think>\nThe answer is \\boxed{{{wrong}}}"
        result = math_reward(response, gold)
        assert result.reward == pytest.approx(0.1), (gold, wrong)
        assert (result.accuracy, result.format, result.error) == (0.0, 1.0, None)


def test_gsm8k_without_think_tags_scores_accuracy_only(golds: list[str]) -> None:
    for gold in golds[:20]:
        result = math_reward(f"The answer is \\boxed{{{gold}}}", gold)
        assert (result.reward, result.accuracy, result.format) == (pytest.approx(0.9), 1.0, 0.0)


def test_gsm8k_answer_written_with_thousands_separator_and_dollar() -> None:
    # GSM8K test row 3: "#### 70000"
    gold = gsm8k_golds(3)[2]
    assert gold == "70000"
    assert accuracy_reward("so he made \\boxed{70,000}", gold) == 1.0
    assert accuracy_reward("so he made \\boxed{\\$70{,}000}", gold) == 1.0


def test_last_boxed_wins() -> None:
    response = "<think>first \\boxed{3}</think> no, actually \\boxed{5}"
    assert math_reward(response, "5").accuracy == 1.0
    assert math_reward(response, "3").accuracy == 0.0


def test_no_box_or_empty_box_scores_zero_without_error() -> None:
    assert math_reward("<think>x</think> 72", "72") == RewardResult(0.0, 0.0, 0.0, None)
    assert math_reward("<think>x</think> \\boxed{}", "72") == RewardResult(0.1, 0.0, 1.0, None)


def test_custom_weights() -> None:
    result = math_reward("<think></think>\\boxed{2}", "2", accuracy_weight=0.5, format_weight=0.25)
    assert result.reward == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("reference", "boxed"),
    [
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("1/2", "0.5"),
        ("0.5", "\\dfrac{1}{2}"),
        ("72", "72.0"),
        ("-3", "-3.00"),
        ("$2\\sin (2x-\\frac{\\pi }{6})$", "2\\sin(2x-\\pi/6)"),  # K12 style reference
        ("$$\\dfrac{3}{2}$$", "1.5"),
        ("30°", "30^\\circ"),
        ("x^2+2x+1", "(x+1)^2"),
        ("\\sqrt{2}", "1.41421356"),
        ("$$A$$", "A"),
    ],
)
def test_equivalent_answers(reference: str, boxed: str) -> None:
    assert accuracy_reward(f"\\boxed{{{boxed}}}", reference) == 1.0


@pytest.mark.parametrize(
    ("reference", "boxed"),
    [("\\frac{1}{2}", "0.51"), ("72", "27"), ("5", "-5"), ("\\sqrt{2}", "1.414"), ("$$A$$", "B")],
)
def test_different_answers(reference: str, boxed: str) -> None:
    assert accuracy_reward(f"\\boxed{{{boxed}}}", reference) == 0.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{72}", "72"),
        ("a \\boxed{\\frac{1}{2}} b", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
        ("\\boxed{\\left\\{ x \\right.}", "\\left\\{ x \\right."),
        ("\\boxed{1} then \\boxed{2", None),  # the last box is cut off: no final answer
        ("no box", None),
        ("\\boxed 5", None),
    ],
)
def test_extract_last_boxed(text: str, expected: str | None) -> None:
    assert extract_last_boxed(text) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>a</think>b\\boxed{1}c", 1.0),
        ("<think>\nline\nline\n</think>\n\nso \\boxed{x}\n", 1.0),
        ("<think></think>\\boxed{}", 1.0),
        (" <think>a</think>\\boxed{1}", 0.0),  # the whole response must match
        ("<think>a\\boxed{1}", 0.0),
        ("<think>a</think> 1", 0.0),
        ("\\boxed{1}<think>a</think>", 0.0),
    ],
)
def test_format_reward(response: str, expected: float) -> None:
    assert format_reward(response) == expected


@pytest.mark.serial  # times itself
def test_hanging_verification_times_out_in_the_main_thread() -> None:
    def mine(signum: int, frame: object) -> None:
        raise AssertionError("the caller's handler must not run")

    previous = signal.signal(signal.SIGALRM, mine)
    try:
        assert equivalent("2", "2") == (True, None)
        start = time.monotonic()
        equal, error = equivalent(HANGING_ANSWER, "1", timeout_s=0.5)
        elapsed = time.monotonic() - start
        assert not equal
        assert error == "timeout: verification took more than 0.5 s"
        assert 0.5 <= elapsed < 0.5 + 0.5
        assert signal.getsignal(signal.SIGALRM) is mine  # restored
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no alarm left armed
        assert equivalent("3", "3") == (True, None)
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_math_reward_reports_the_timeout_and_keeps_the_format_score() -> None:
    result = math_reward(f"<think>x</think>\\boxed{{{HANGING_ANSWER}}}", "1", timeout_s=0.5)
    assert result.error is not None and result.error.startswith("timeout")
    assert result.reward == pytest.approx(0.1)  # accuracy 0, format still counts
    assert threading.current_thread() is threading.main_thread()


def test_invalid_timeout() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        equivalent("1", "1", timeout_s=0)


def test_last_number_fallback_judges_prose_answers_only_without_a_box() -> None:
    from shuffle_r1.rewards import last_number, math_reward_last_number_fallback

    assert last_number("so 1,234 clips, then 72.") == "72"
    assert last_number("no digits here") is None
    prose = "The correct answer is: 72."
    assert math_reward(prose, "72").reward == 0.0
    assert math_reward_last_number_fallback(prose, "72").accuracy == 1.0
    assert math_reward_last_number_fallback("It is 71, not 72. So 71", "72").accuracy == 0.0
    # a box, when present, still decides, even if a later number is right
    boxed_wrong = "<think>t</think> \\boxed{70} and maybe 72"
    assert math_reward_last_number_fallback(boxed_wrong, "72").reward == pytest.approx(0.1)
