"""The math reward of the reference recipe (docs/algorithm.md §6).

    reward = accuracy_weight · accuracy + format_weight · format        (0.9 and 0.1 by default)

- **format** is 1 when the whole response matches ``<think>.*</think>.*\\boxed{.*}.*`` (dot
  matches newlines), else 0.
- **accuracy** is 1 when the content of the *last* ``\\boxed{...}`` is equivalent to the
  reference answer according to math-verify (string, numeric or symbolic equality), else 0.

Equivalence is math-verify's verdict (:func:`equivalent`). Its own timeouts rely on
``signal.alarm``, which works only in a main thread; :func:`equivalent` sets one deadline of
``timeout_s`` for parsing and comparing together when it runs in a main thread, as it does in
the reward workers' processes (:mod:`shuffle_r1.rewards.isolation`), which also kill a call
that hangs where no signal reaches it. An overrun gives accuracy 0 and an ``error`` on the
:class:`RewardResult`.

Reward functions are pluggable: any ``module:function`` with the signature of
:func:`math_reward` can be named in the config (``reward.function``) and loaded with
:func:`shuffle_r1.rewards.load_reward_fn`.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

FORMAT_PATTERN = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
_BOXED = "\\boxed{"
# An answer written as $...$ or $$...$$ (K12 and MATH-style references).
_DOLLARS = re.compile(r"\$\$?([^$]*)\$\$?")


@dataclass(frozen=True)
class RewardResult:
    """One response's reward (docs/algorithm.md §6).

    ``reward`` is the weighted sum; ``accuracy`` and ``format`` are 0.0 or 1.0. ``error`` is
    None when accuracy was decided, else why it could not be (the verification timed out, the
    verifier failed); accuracy is then 0. ``scores`` are the named scores the reward workers
    collected from the configured functions (``shuffle_r1.rewards.record.combine``); a
    function returns it without them.
    """

    reward: float
    accuracy: float
    format: float
    error: str | None = None
    scores: dict[str, float] = field(default_factory=dict)


RewardFn = Callable[..., RewardResult]


def extract_last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text``, or None.

    Braces are matched, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; escaped braces
    (``\\{``, ``\\}``) do not count. Only the braced form is recognised (``\\boxed 5`` is not).
    When the last ``\\boxed{`` is never closed (a response cut at the length limit) the result
    is None: an earlier, complete box is not the final answer.
    """
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth = 1
    i = start + len(_BOXED)
    content_start = i
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped character, \{ and \} included
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[content_start:i]
        i += 1
    return None


def format_reward(response: str) -> float:
    """1.0 iff the whole response matches ``<think>.*</think>.*\\boxed{.*}.*`` (§6), else 0.0."""
    return 1.0 if FORMAT_PATTERN.fullmatch(response) else 0.0


def _strip_dollars(answer: str) -> str:
    """``$x$`` / ``$$x$$`` -> ``x``; anything else unchanged (stripped of outer whitespace)."""
    answer = answer.strip()
    match = _DOLLARS.fullmatch(answer)
    return match.group(1).strip() if match else answer


class _Deadline(BaseException):
    """Raised by SIGALRM during a verification. A BaseException, so that math-verify's
    ``except Exception`` around each comparison does not swallow it."""


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Deadline


class _DropTimeoutDisabledWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


# math-verify's own signal timeouts are off on purpose (equivalent() sets one deadline for
# parsing and comparing together); its warning about that would otherwise fill the logs.
for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def equivalent(prediction: str, reference: str, timeout_s: float = 5.0) -> tuple[bool, str | None]:
    """(equal, error): math-verify's verdict on a boxed prediction against a reference answer.

    The prediction is parsed as ``\\boxed{prediction}``. The reference is parsed two ways and
    matches if either does: as ``\\boxed{reference}`` (plain numbers, ``1/2``, bare LaTeX such
    as ``2\\sin(2x-\\frac{\\pi}{6})``, with surrounding ``$`` removed) and as math-verify
    reads it in prose (``$...$`` / ``$$...$$`` spans, ``30°``, ``18.``).

    In the main thread, parsing and comparing together run under a deadline of ``timeout_s``
    seconds (``SIGALRM``; the previous handler is restored, an interval timer of the caller's
    is cleared); an overrun gives ``(False, "timeout: ...")``. Elsewhere signals cannot be
    used and there is no deadline: the reward workers call it in the main thread of a
    process they kill at a hard deadline (:class:`shuffle_r1.rewards.RewardProcessPool`).
    A math-verify failure gives ``(False, "verify_error: ...")``.

    Raises:
        ValueError: ``timeout_s`` is not > 0.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    from math_verify import parse, verify  # imported before the deadline starts

    reference = reference.strip()
    prose = reference if "$" in reference else f"${reference}$"
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGALRM, _on_alarm) if in_main else None
    try:
        try:
            if in_main:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
            gold = parse(f"\\boxed{{{_strip_dollars(reference)}}}", parsing_timeout=None)
            gold += parse(prose, parsing_timeout=None)
            pred = parse(f"\\boxed{{{_strip_dollars(prediction)}}}", parsing_timeout=None)
            return bool(gold and pred and verify(gold, pred, timeout_seconds=None)), None
        finally:
            if in_main:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _Deadline:
        error = f"timeout: verification took more than {timeout_s} s"
    except Exception as exc:  # math-verify and sympy may raise anything on odd input
        error = f"verify_error: {type(exc).__name__}: {exc}"[:500]
    finally:
        if in_main:
            signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)
    logger.warning("math verification failed (%s); accuracy 0", error)
    return False, error


_LAST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (thousands commas removed), or None."""
    found = _LAST_NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def _accuracy(
    response: str, reference_answer: str, timeout_s: float, fallback_last_number: bool = False
) -> tuple[float, str | None]:
    boxed = extract_last_boxed(response)
    if (boxed is None or not boxed.strip()) and fallback_last_number:
        boxed = last_number(response)
    if boxed is None or not boxed.strip():
        return 0.0, None
    equal, error = equivalent(boxed, reference_answer, timeout_s)
    return (1.0 if equal else 0.0), error


def accuracy_reward(response: str, reference_answer: str, timeout_s: float = 5.0) -> float:
    """1.0 iff the last ``\\boxed{}`` of ``response`` is equivalent to ``reference_answer`` (§6).

    A response without a (closed) box scores 0. ``timeout_s`` bounds the verification in
    seconds (in the main thread: :func:`equivalent`); a timeout or a verifier failure scores 0
    and is logged (:func:`math_reward` also returns the error).
    """
    return _accuracy(response, reference_answer, timeout_s)[0]


def math_reward(
    response: str,
    reference_answer: str,
    accuracy_weight: float = 0.9,
    format_weight: float = 0.1,
    timeout_s: float = 5.0,
) -> RewardResult:
    """The default reward: ``accuracy_weight · accuracy + format_weight · format`` (§6).

    This signature is the contract for pluggable reward functions
    (:func:`shuffle_r1.rewards.load_reward_fn`). ``timeout_s`` bounds math-verify when called
    in a main thread (:func:`equivalent`).
    """
    return _weighted(response, reference_answer, accuracy_weight, format_weight, timeout_s)


def _weighted(
    response: str,
    reference_answer: str,
    accuracy_weight: float,
    format_weight: float,
    timeout_s: float,
    fallback_last_number: bool = False,
) -> RewardResult:
    accuracy, error = _accuracy(response, reference_answer, timeout_s, fallback_last_number)
    fmt = format_reward(response)
    return RewardResult(
        reward=accuracy_weight * accuracy + format_weight * fmt,
        accuracy=accuracy,
        format=fmt,
        error=error,
    )


def math_reward_last_number_fallback(
    response: str,
    reference_answer: str,
    accuracy_weight: float = 0.9,
    format_weight: float = 0.1,
    timeout_s: float = 5.0,
) -> RewardResult:
    """:func:`math_reward`, except that a response with no ``\\boxed{}`` is judged by the
    last number it writes.

    Not the paper's recipe (§6 judges only the last box): it is for small models that
    never write a box — SmolLM2-135M-Instruct, the embedded CPU default, answers GSM8K in
    prose ("The correct answer is: 72.") and would otherwise give every rollout reward 0,
    i.e. no group with any advantage contrast and no update at all.
    """
    return _weighted(response, reference_answer, accuracy_weight, format_weight, timeout_s, True)
