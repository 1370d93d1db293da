"""The math reward of the reference recipe (docs/algorithm.md §6).

    reward = accuracy_weight · accuracy + format_weight · format        (0.9 and 0.1 by default)

- **format** is 1 when the whole response matches ``<think>.*</think>.*\\boxed{.*}.*`` (dot
  matches newlines), else 0.
- **accuracy** is 1 when the content of the *last* ``\\boxed{...}`` is equivalent to the
  reference answer according to math-verify (string, numeric or symbolic equality), else 0.

Equivalence checks run in a separate worker process (:class:`MathVerifier`). math-verify's
own timeout relies on ``signal.alarm`` and refuses to run outside the main thread; the worker
runs it in *its* main thread, under a deadline of ``timeout_s`` for parsing and comparing
together, so a reward can be computed from any thread (a Ray actor's, a thread pool's). A
verification that overruns, or a worker that hangs in C code where no signal reaches it, gives
accuracy 0 and an ``error`` on the :class:`RewardResult`; the verifier counts both, and a hung
worker is killed and replaced on the next call.

Reward functions are pluggable: any ``module:function`` with the signature of
:func:`math_reward` can be named in the config (``reward.function``) and loaded with
:func:`load_reward_fn`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT_PATTERN = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
_BOXED = "\\boxed{"
# An answer written as $...$ or $$...$$ (K12 and MATH-style references).
_DOLLARS = re.compile(r"\$\$?([^$]*)\$\$?")
# A worker that does not answer within timeout_s + this margin is taken to be hung in C code.
KILL_MARGIN_S = 1.0
# How long a fresh worker may take to import math-verify (sympy, latex2sympy2).
WORKER_START_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class RewardResult:
    """One response's reward (docs/algorithm.md §6).

    ``reward`` is the weighted sum; ``accuracy`` and ``format`` are 0.0 or 1.0. ``error`` is
    None when accuracy was decided, else why it could not be (the verification timed out, the
    verifier failed); accuracy is then 0.
    """

    reward: float
    accuracy: float
    format: float
    error: str | None = None


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


# ---------------------------------------------------------------------------------------
# The worker process: runs math-verify in its own main thread, one request per line.


class _Deadline(BaseException):
    """Raised by SIGALRM inside the worker. A BaseException, so that math-verify's
    ``except Exception`` around each comparison does not swallow it."""


def _equivalent(prediction: str, reference: str) -> bool:
    """math-verify's verdict on a boxed prediction against a reference (worker side).

    The prediction is parsed as ``\\boxed{prediction}``. The reference is parsed two ways and
    matches if either does: as ``\\boxed{reference}`` (plain numbers, ``1/2``, bare LaTeX such
    as ``2\\sin(2x-\\frac{\\pi}{6})``, with surrounding ``$`` removed) and as math-verify reads
    it in prose (``$...$`` / ``$$...$$`` spans, ``30°``, ``18.``).
    """
    from math_verify import parse, verify

    reference = reference.strip()
    prose = reference if "$" in reference else f"${reference}$"
    gold = parse(f"\\boxed{{{_strip_dollars(reference)}}}", parsing_timeout=None)
    gold += parse(prose, parsing_timeout=None)
    pred = parse(f"\\boxed{{{_strip_dollars(prediction)}}}", parsing_timeout=None)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=None))


class _DropTimeoutDisabledWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


def _serve() -> None:
    """Worker main loop: JSON requests on stdin, one JSON answer per line on stdout.

    Request ``{"id", "prediction", "reference", "timeout_s"}``; answer ``{"id", "equal",
    "error"}``. Exits when stdin closes (the parent is gone or closed it).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints must not corrupt the protocol
    import math_verify  # noqa: F401  (import before "ready": the start is paid once)

    # We disable math-verify's signal timeouts on purpose; our deadline covers both steps.
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(_DropTimeoutDisabledWarning())

    def on_alarm(signum: int, frame: Any) -> None:
        raise _Deadline

    signal.signal(signal.SIGALRM, on_alarm)
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        answer: dict[str, Any] = {"id": request["id"], "equal": False, "error": None}
        try:
            signal.setitimer(signal.ITIMER_REAL, request["timeout_s"])
            try:
                answer["equal"] = _equivalent(request["prediction"], request["reference"])
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _Deadline:
            answer["error"] = f"timeout: verification took more than {request['timeout_s']} s"
        except Exception as exc:
            answer["error"] = f"verify_error: {type(exc).__name__}: {exc}"[:500]
        out.write(json.dumps(answer) + "\n")
        out.flush()


# ---------------------------------------------------------------------------------------
# The parent side.


class MathVerifier:
    """Decides answer equivalence with math-verify in a worker process, under a deadline.

    Thread-safe: calls are serialised on one worker (the deadline of a call starts when it
    reaches the worker, not while it waits for another thread's call). The worker starts on
    the first call (about a second: it imports sympy) and is replaced after it hangs or dies.
    ``stats`` counts calls, timeouts (deadline in the worker), kills (hung worker), errors.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._next_id = 0
        self.stats = {"calls": 0, "timeouts": 0, "kills": 0, "errors": 0, "starts": 0}

    def equivalent(
        self, prediction: str, reference: str, timeout_s: float = 5.0
    ) -> tuple[bool, str | None]:
        """(equal, error) for one prediction against one reference answer.

        Returns within about ``timeout_s + KILL_MARGIN_S`` seconds once the worker runs. On a
        timeout or a failure, ``equal`` is False and ``error`` says why (``"timeout: ..."``,
        ``"worker_hung: ..."``, ``"worker_died: ..."``, ``"verify_error: ..."``).
        """
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        with self._lock:
            self.stats["calls"] += 1
            equal, error = self._call(prediction, reference, timeout_s)
            if error is not None:
                kind = error.split(":", 1)[0]
                self.stats["timeouts" if kind == "timeout" else "errors"] += 1
                logger.warning("math verification failed (%s); accuracy 0", error)
            return equal, error

    def close(self) -> None:
        """Stop the worker (it exits when its stdin closes). Safe to call twice."""
        with self._lock:
            self._stop(kill=False)

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def worker_pid(self) -> int | None:
        """The worker's process id, or None when no worker runs."""
        return self._proc.pid if self._proc is not None else None

    def _call(self, prediction: str, reference: str, timeout_s: float) -> tuple[bool, str | None]:
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        assert self._proc is not None and self._proc.stdin is not None
        self._next_id += 1
        request = {
            "id": self._next_id,
            "prediction": prediction,
            "reference": reference,
            "timeout_s": timeout_s,
        }
        try:
            data = memoryview((json.dumps(request) + "\n").encode())
            while data:  # a raw pipe write may be partial
                data = data[os.write(self._proc.stdin.fileno(), data) :]
            answer = self._read_line(timeout_s + KILL_MARGIN_S)
        except (BrokenPipeError, EOFError) as exc:
            self._stop(kill=True)
            return False, f"worker_died: {exc}"
        if answer is None:
            self.stats["kills"] += 1
            self._stop(kill=True)
            return False, (
                f"worker_hung: no answer within {timeout_s + KILL_MARGIN_S:.1f} s; worker killed"
            )
        if answer.get("id") != self._next_id:
            self._stop(kill=True)
            return False, f"worker_died: answer for request {answer.get('id')}, not {request['id']}"
        return bool(answer["equal"]), answer["error"]

    def _start(self) -> None:
        self._stop(kill=True)
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from shuffle_r1.rewards.math import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            bufsize=0,
        )
        self._buffer = b""
        self.stats["starts"] += 1
        try:
            ready = self._read_line(WORKER_START_TIMEOUT_S)
        except EOFError as exc:
            self._stop(kill=True)
            raise RuntimeError(f"math-verify worker exited during start: {exc}") from exc
        if ready != {"ready": True}:
            self._stop(kill=True)
            raise RuntimeError(
                f"math-verify worker did not start within {WORKER_START_TIMEOUT_S} s "
                f"(is math-verify installed in {sys.executable}?)"
            )

    def _read_line(self, timeout_s: float) -> dict[str, Any] | None:
        """The next JSON line from the worker, or None after ``timeout_s`` seconds.

        Raises EOFError when the worker closed its stdout (it died)."""
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([fd], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise EOFError(f"worker exited with code {self._proc.wait()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def _stop(self, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        else:
            assert proc.stdin is not None
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


_default_verifier: MathVerifier | None = None
_default_lock = threading.Lock()


def default_verifier() -> MathVerifier:
    """The process-wide verifier that :func:`accuracy_reward` and :func:`math_reward` use."""
    global _default_verifier
    with _default_lock:
        if _default_verifier is None:
            _default_verifier = MathVerifier()
            atexit.register(_default_verifier.close)
        return _default_verifier


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
    equal, error = default_verifier().equivalent(boxed, reference_answer, timeout_s)
    return (1.0 if equal else 0.0), error


def accuracy_reward(response: str, reference_answer: str, timeout_s: float = 5.0) -> float:
    """1.0 iff the last ``\\boxed{}`` of ``response`` is equivalent to ``reference_answer`` (§6).

    A response without a (closed) box scores 0. ``timeout_s`` bounds the verification in
    seconds; a timeout or a verifier failure scores 0, is logged and counted in
    ``default_verifier().stats`` (:func:`math_reward` also returns the error).
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

    This signature is the contract for pluggable reward functions (:func:`load_reward_fn`).
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


def load_reward_fn(path: str) -> RewardFn:
    """Import a reward function named ``"package.module:function"``.

    The function must take ``(response, reference_answer, accuracy_weight=..., format_weight=...,
    timeout_s=...)`` and return a :class:`RewardResult`, like :func:`math_reward`.
    Raises ValueError naming ``path`` when it is malformed, cannot be imported, has no such
    attribute, or names something that is not callable.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"reward function {path!r} must be 'module:function', "
            "e.g. 'shuffle_r1.rewards:math_reward'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"reward function {path!r}: cannot import module {module_name!r}: {exc}"
        ) from exc
    try:
        fn = getattr(module, attr)
    except AttributeError as exc:
        raise ValueError(
            f"reward function {path!r}: module {module_name!r} has no attribute {attr!r}"
        ) from exc
    if not callable(fn):
        raise ValueError(f"reward function {path!r} is a {type(fn).__name__}, not a callable")
    return fn
