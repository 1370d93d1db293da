"""Reward workers: score completions with a pluggable verifiable-reward function.

The function is named by a Python path in ``reward.function`` (default
``shuffle_r1.rewards:math_reward``, docs/ALGORITHM.md §6) and called as
``fn(response, reference_answer, accuracy_weight=..., format_weight=..., timeout_s=...)``;
it returns a :class:`shuffle_r1.rewards.RewardResult` (or a plain float, taken as both
reward and accuracy). A function that raises, returns garbage, or runs past
``timeout_s + grace`` gives reward 0 and a counted error: the run never crashes or hangs on
a reward. (A hung call's thread cannot be killed; it is abandoned and counted.)

The role is a Ray Serve application (:class:`RewardPool`): the trainer scores through a
deployment handle, and outside verifiers and evaluation scripts through its HTTP endpoint
(``POST`` JSON to ``reward.http_route`` on Serve's proxy, ``reward.http_host:http_port``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from actors.metrics import ray_metric
from actors.rollout import HEALTH_CHECK_PERIOD_S
from actors.serving import worker_id
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
    """Scores :class:`ScoreRequest` s with the configured reward function: a replica of the
    reward Serve application (:class:`RewardPool`), or a plain Ray actor in tests."""

    def __init__(self, cfg: RewardConfig, run_id: str = "") -> None:
        self.cfg = cfg
        self.fn = load_reward_fn(cfg.function)
        self.errors: Counter[str] = Counter()
        self.worker_id = worker_id()
        self._m_scored = ray_metric("shuffle_r1_reward_worker_scored_total")
        self._m_errors = ray_metric("shuffle_r1_reward_worker_errors_total")
        self._m_seconds = ray_metric("shuffle_r1_reward_worker_seconds")
        for metric in (self._m_scored, self._m_errors, self._m_seconds):
            metric.set_default_tags({"worker": self.worker_id, "run": run_id})

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

    def _score(self, requests: Sequence[ScoreRequest]) -> list[RewardResult]:
        start = time.perf_counter()
        results = [self._call_with_deadline(r) for r in requests]
        self._m_seconds.observe(time.perf_counter() - start)
        self._m_scored.inc(len(results))
        for r in results:
            if r.error is not None:
                self._m_errors.inc(1, tags={"kind": r.error.split(":", 1)[0]})
        return results

    async def score(self, requests: Sequence[ScoreRequest]) -> list[RewardResult]:
        """One :class:`RewardResult` per request, in order; failures give reward 0."""
        return await asyncio.to_thread(self._score, requests)

    async def __call__(self, request: Any) -> Any:
        """``POST <reward.http_route>`` (Ray Serve's HTTP proxy) with a JSON body
        ``{"response": str, "reference_answer": str}`` → ``{"reward", "accuracy", "format",
        "error"}``, or ``{"items": [{...}, ...]}`` → ``{"results": [...]}`` in order. A body
        that is not such JSON answers 400 naming what was wrong."""
        from starlette.responses import JSONResponse

        try:
            body = await request.json()
        except ValueError as exc:
            return JSONResponse({"error": f"the body is not JSON: {exc}"}, status_code=400)
        try:
            items, single = parse_score_body(body)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        results = [dataclasses.asdict(r) for r in await self.score(items)]
        return JSONResponse(results[0] if single else {"results": results})

    def error_counts(self) -> dict[str, int]:
        return dict(self.errors)

    def ping(self) -> dict[str, Any]:
        return {"worker": self.worker_id, "pid": os.getpid()}


def parse_score_body(body: Any) -> tuple[list[ScoreRequest], bool]:
    """The requests of an HTTP scoring body (see :meth:`RewardWorker.__call__`) and whether it
    held a single item. Raises ``ValueError`` naming the field (``items[3].response``)."""
    single = isinstance(body, dict) and "items" not in body
    if single:
        raw = [body]
    elif isinstance(body, dict) and isinstance(body["items"], list) and body["items"]:
        raw = body["items"]
    else:
        raise ValueError(
            'expected {"response": ..., "reference_answer": ...} or {"items": [...]} '
            "with at least one item"
        )
    items = []
    for i, item in enumerate(raw):
        where = "" if single else f"items[{i}]."
        if not isinstance(item, dict):
            raise ValueError(f"{where or 'the body'} must be an object, got {type(item).__name__}")
        for key in ("response", "reference_answer"):
            if not isinstance(item.get(key), str):
                raise ValueError(f"{where}{key} must be a string")
        items.append(ScoreRequest(item["response"], item["reference_answer"]))
    return items, single


REWARD_DEPLOYMENT = "RewardWorker"


class RewardPool:
    """The reward role: a Ray Serve application of ``cfg.num_workers`` :class:`RewardWorker`
    replicas (no CPU reserved: scoring is light), reachable by handle from the trainer and over
    HTTP at ``<url>`` (``POST``, JSON; see :meth:`RewardWorker.__call__`) from outside
    verifiers and evaluation scripts.

    :meth:`score` splits the requests into contiguous chunks, one per replica; the chunk of a
    replica that dies is re-sent (at most ``max_resends`` times) and Serve replaces it.
    """

    def __init__(self, cfg: RewardConfig, run_id: str, max_resends: int = 3) -> None:
        from ray import serve

        from actors.serving import LOGGING, ensure_serve

        self.cfg = cfg
        self.app = f"{run_id}-reward"
        self.max_resends = max_resends
        self.resent = 0
        base = ensure_serve(cfg.http_host, cfg.http_port)
        deployment = serve.deployment(
            name=REWARD_DEPLOYMENT,
            num_replicas=cfg.num_workers,
            ray_actor_options={"num_cpus": 0},
            max_ongoing_requests=1,  # one chunk per replica at a time: an even spread
            health_check_period_s=HEALTH_CHECK_PERIOD_S,
        )(RewardWorker)
        self.handle = serve.run(
            deployment.bind(cfg, run_id),
            name=self.app,
            route_prefix=cfg.http_route,
            logging_config=LOGGING,
        )
        self.url = base + cfg.http_route
        logger.info("reward: %d workers, HTTP endpoint %s", cfg.num_workers, self.url)

    @property
    def num_workers(self) -> int:
        from actors.serving import running_replicas

        return running_replicas(self.app, REWARD_DEPLOYMENT)

    def score(self, requests: Sequence[ScoreRequest]) -> list[RewardResult]:
        from actors.serving import dispatch, split

        chunks = split(list(requests), max(1, min(self.cfg.num_workers, len(requests))))
        sent = dispatch(self.handle.score.remote, chunks, self.max_resends, "reward")
        self.resent += sent.resent_items
        return [r for chunk in sent.results if chunk for r in chunk]

    def error_counts(self) -> dict[str, int]:
        """Errors per kind summed over the running replicas (a replaced one's are gone)."""
        total: Counter[str] = Counter()
        for counts in self.handle.broadcast("error_counts").results():
            total.update(counts)
        return dict(total)

    def shutdown(self) -> None:
        from ray import serve

        serve.delete(self.app)
