"""Reward workers: score completions with a pluggable verifiable-reward function.

The function is named by a Python path in ``reward.function`` (default
``shuffle_r1.rewards:math_reward``, ALGORITHM.md §6) and called as
``fn(response, reference_answer, accuracy_weight=..., format_weight=..., timeout_s=...)``;
it returns a :class:`shuffle_r1.rewards.RewardResult` (or a plain float, taken as both
reward and accuracy). A function that raises, returns garbage, or runs past
``timeout_s + grace`` gives reward 0 and a counted error: the run never crashes or hangs on
a reward. (A hung call's thread cannot be killed; it is abandoned and counted.)
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from shuffle_r1.config import RewardConfig
from shuffle_r1.rewards import RewardResult, load_reward_fn

logger = logging.getLogger(__name__)

GRACE_S = 2.0  # on top of reward.timeout_s before a call counts as hung


@dataclass(frozen=True)
class ScoreRequest:
    """One completion to score: its decoded text and the reference answer."""

    response: str
    reference_answer: str


class RewardWorker:
    """Scores :class:`ScoreRequest` s with the configured reward function (a Ray actor)."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self.fn = load_reward_fn(cfg.function)
        self.errors: Counter[str] = Counter()

    def _call(self, req: ScoreRequest) -> RewardResult:
        out = self.fn(
            req.response,
            req.reference_answer,
            accuracy_weight=self.cfg.accuracy_weight,
            format_weight=self.cfg.format_weight,
            timeout_s=self.cfg.timeout_s,
        )
        if isinstance(out, RewardResult):
            result = out
        elif isinstance(out, int | float) and not isinstance(out, bool):
            result = RewardResult(reward=float(out), accuracy=float(out), format=0.0)
        else:
            raise TypeError(f"returned {type(out).__name__}, expected RewardResult or float")
        if not math.isfinite(result.reward):
            raise ValueError(f"returned a non-finite reward {result.reward!r}")
        return result

    def _call_with_deadline(self, req: ScoreRequest) -> RewardResult:
        """Run one call in its own daemon thread; abandon it at the deadline."""
        box: list[RewardResult | BaseException] = []

        def run() -> None:
            try:
                box.append(self._call(req))
            except Exception as exc:  # a pluggable function may raise anything
                box.append(exc)

        thread = threading.Thread(target=run, name="reward-call", daemon=True)
        thread.start()
        thread.join(self.cfg.timeout_s + GRACE_S)
        if not box:
            self.errors["hung"] += 1
            return RewardResult(
                0.0, 0.0, 0.0, error=f"hung: no answer in {self.cfg.timeout_s + GRACE_S:.1f} s"
            )
        outcome = box[0]
        if isinstance(outcome, BaseException):
            self.errors["raised"] += 1
            logger.warning("reward function %s raised: %r", self.cfg.function, outcome)
            return RewardResult(0.0, 0.0, 0.0, error=f"raised: {outcome!r}"[:500])
        if outcome.error:
            self.errors[outcome.error.split(":", 1)[0]] += 1
        return outcome

    def score(self, requests: Sequence[ScoreRequest]) -> list[RewardResult]:
        """One :class:`RewardResult` per request, in order; failures give reward 0."""
        return [self._call_with_deadline(r) for r in requests]

    def error_counts(self) -> dict[str, int]:
        return dict(self.errors)

    def ping(self) -> bool:
        return True


class RewardPool:
    """``cfg.num_workers`` :class:`RewardWorker` actors (no CPU reserved: scoring is light).

    :meth:`score` splits requests into contiguous chunks, one per worker; a worker that dies
    is replaced and its chunk re-sent (at most ``max_resends`` times).
    """

    def __init__(self, cfg: RewardConfig, max_resends: int = 3) -> None:
        self.cfg = cfg
        self.max_resends = max_resends
        self._actor: Any = ray.remote(RewardWorker).options(num_cpus=0)
        self.workers: list[Any] = [self._actor.remote(cfg) for _ in range(cfg.num_workers)]
        self.resent = 0

    def score(self, requests: Sequence[ScoreRequest]) -> list[RewardResult]:
        n = len(self.workers)
        size = math.ceil(len(requests) / n) if requests else 0
        chunks = [
            list(range(i, min(i + size, len(requests)))) for i in range(0, len(requests), size or 1)
        ]
        out: list[RewardResult | None] = [None] * len(requests)
        pending = [(slot % n, chunk) for slot, chunk in enumerate(chunks)]
        for attempt in range(self.max_resends + 1):
            calls = [
                (slot, chunk, self.workers[slot].score.remote([requests[i] for i in chunk]))
                for slot, chunk in pending
            ]
            lost = []
            for slot, chunk, ref in calls:
                try:
                    for i, result in zip(chunk, ray.get(ref), strict=True):
                        out[i] = result
                except RayActorError:
                    logger.warning("reward worker %d died; replacing it and re-sending", slot)
                    self.workers[slot] = self._actor.remote(self.cfg)
                    lost.append((slot, chunk))
            if not lost:
                break
            if attempt == self.max_resends:
                raise RuntimeError(
                    f"reward workers died {self.max_resends + 1} times on the same requests"
                )
            self.resent += sum(len(c) for _, c in lost)
            pending = lost
        return [r for r in out if r is not None]

    def error_counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for counts in ray.get([w.error_counts.remote() for w in self.workers]):
            total.update(counts)
        return dict(total)

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers.clear()
