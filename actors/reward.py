"""Reward workers: score completions with a pluggable verifiable-reward function.

The function is named by a Python path in ``reward.function`` (default
``shuffle_r1.rewards:math_reward``, docs/algorithm.md §6), or several with weights in
``reward.functions``. Each is called with a :class:`shuffle_r1.rewards.RewardInput` (prompt,
response, reference answer, the row's other columns, the number of images) or, by the legacy
signature, as ``fn(response, reference_answer, accuracy_weight=..., format_weight=...,
timeout_s=...)`` (:func:`shuffle_r1.rewards.takes_record` decides); it returns a float, a
dict of named scores or a :class:`shuffle_r1.rewards.RewardResult`, and the reward is the
weighted sum (:func:`shuffle_r1.rewards.combine`). Each worker runs the functions in
processes of its own (:class:`shuffle_r1.rewards.RewardProcessPool`), in their main thread,
so the functions' signal-based timeouts work. A call that raises (``kind=raised``), returns
garbage (a wrong type or a non-finite score: counted as raised), runs past
``timeout_s + grace`` (its process is killed: ``hung``) or whose process dies (``died``)
adds 0 and a counted error, and the next call gets a fresh process: the run never crashes or
hangs on a reward.

The role is a Ray Serve application (:class:`RewardPool`) of two deployments: the trainer
scores through a handle of the :class:`RewardWorker` replicas, and outside verifiers and
evaluation scripts through the HTTP endpoint, :class:`RewardEndpoint` (``POST`` JSON to
``reward.http_route`` on Serve's proxy, ``reward.http_host:http_port``, loopback by default).
The endpoint is its own replica, so HTTP traffic never occupies a worker the training job is
waiting for. It refuses, before scoring anything:

- a request without ``Authorization: Bearer <token>`` when a token is set
  (``reward.http_token``, else ``$SHUFFLE_R1_REWARD_TOKEN``): 401;
- a body over ``reward.max_request_kb`` (by its Content-Length, or counted as a chunked body
  arrives, so it is never read whole): 413; more than :data:`MAX_HTTP_ITEMS` items: 413;
- a request not answered within ``reward.request_timeout_s`` (reading the body included):
  504; its remaining items are dropped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from actors.metrics import ray_metric
from actors.serving import HEALTH_CHECK_PERIOD_S, worker_id
from shuffle_r1.config import REWARD_TOKEN_ENV, RewardConfig, is_loopback
from shuffle_r1.limits import REWARD_GRACE_S, echo
from shuffle_r1.rewards import RewardInput, RewardProcessPool, RewardResult, combine

logger = logging.getLogger(__name__)

GRACE_S = REWARD_GRACE_S  # on top of reward.timeout_s before a call is killed as hung
TOKEN_ENV = REWARD_TOKEN_ENV  # the endpoint's bearer token when reward.http_token is ""
# Items one HTTP request may hold: bounds the work (and the time) of one request, whatever
# its size; a caller with more splits them. The trainer's own scoring has no such limit.
MAX_HTTP_ITEMS = 256
# Requests the endpoint replica scores at once, and how many more Serve queues (beyond: 503)
HTTP_CONCURRENCY = 4
HTTP_QUEUE = 16


# One completion to score: its decoded text, the reference answer and, for record-taking
# functions, the prompt's user text, the row's other columns and its number of images.
ScoreRequest = RewardInput


class RewardWorker:
    """Scores :class:`ScoreRequest` s with the configured reward function: a replica of the
    reward Serve application (:class:`RewardPool`), or a plain Ray actor in tests.

    The functions run in at most ``processes`` worker processes (one call each at a time),
    started here: a function that does not import raises ``ValueError`` naming it.
    """

    def __init__(self, cfg: RewardConfig, run_id: str = "", processes: int = 1) -> None:
        self.cfg = cfg
        self.functions = cfg.weighted_functions()
        paths = [path for _, path, _ in self.functions]
        self.pool = RewardProcessPool(paths, cfg.timeout_s + GRACE_S, processes)
        self.errors: Counter[str] = Counter()
        self.worker_id = worker_id()
        self._m_scored = ray_metric("shuffle_r1_reward_worker_scored_total")
        self._m_errors = ray_metric("shuffle_r1_reward_worker_errors_total")
        self._m_seconds = ray_metric("shuffle_r1_reward_worker_seconds")
        for metric in (self._m_scored, self._m_errors, self._m_seconds):
            metric.set_default_tags({"worker": self.worker_id, "run": run_id})

    def _call(self, req: ScoreRequest) -> RewardResult:
        """One request scored by every configured function in the pool, combined
        (:func:`shuffle_r1.rewards.combine`); a function that fails adds 0, and the item's
        error is counted by kind (the prefix of ``error``)."""
        parts = []
        for index, (_, path, weight) in enumerate(self.functions):
            outcome = self.pool.call(
                req,
                index,
                accuracy_weight=self.cfg.accuracy_weight,
                format_weight=self.cfg.format_weight,
                timeout_s=self.cfg.timeout_s,
            )
            if outcome.error is not None:
                logger.warning("reward function %s failed: %s", path, outcome.error)
            parts.append((weight, outcome.value, outcome.error))
        result = combine(parts)
        if result.error:
            self.errors[result.error.split(":", 1)[0]] += 1
        return result

    def _score(
        self, requests: Sequence[ScoreRequest], stop: threading.Event | None = None
    ) -> list[RewardResult]:
        """Score in order; with ``stop``, stop before the next item once it is set (the
        results are then short: the caller has given up on them)."""
        start = time.perf_counter()
        results: list[RewardResult] = []
        for r in requests:
            if stop is not None and stop.is_set():
                break
            results.append(self._call(r))
        self._m_seconds.observe(time.perf_counter() - start)
        self._m_scored.inc(len(results))
        for result in results:
            if result.error is not None:
                self._m_errors.inc(1, tags={"kind": result.error.split(":", 1)[0]})
        return results

    async def score(self, requests: Sequence[ScoreRequest]) -> list[RewardResult]:
        """One :class:`RewardResult` per request, in order; failures give reward 0."""
        return await asyncio.to_thread(self._score, requests)

    def error_counts(self) -> dict[str, int]:
        return dict(self.errors)

    def ping(self) -> dict[str, Any]:
        """This replica's id, its process id and those of its reward processes."""
        return {"worker": self.worker_id, "pid": os.getpid(), "reward_pids": self.pool.pids()}


class Refused(Exception):
    """An HTTP request the endpoint answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_score_body(body: Any) -> tuple[list[ScoreRequest], bool]:
    """The requests of an HTTP scoring body (see :meth:`RewardEndpoint.__call__`) and whether
    it held a single item.

    Each item holds ``response`` and ``reference_answer`` (strings) and, optionally,
    ``prompt`` (a string), ``row`` (an object: the dataset row's other columns) and
    ``num_images`` (an integer >= 0), which record-taking reward functions receive
    (:class:`shuffle_r1.rewards.RewardInput`); absent, they are ``""``, ``{}`` and 0. Their
    size is bounded by the body's, ``reward.max_request_kb``.

    Raises:
        Refused: 400 naming the field that is wrong (``items[3].response``), or 413 for more
            than :data:`MAX_HTTP_ITEMS` items.
    """
    single = isinstance(body, dict) and "items" not in body
    if single:
        raw = [body]
    elif isinstance(body, dict) and isinstance(body["items"], list) and body["items"]:
        raw = body["items"]
    else:
        raise Refused(
            400,
            'expected {"response": ..., "reference_answer": ...} or {"items": [...]} '
            f"with at least one item; got {echo(body)}",
        )
    if len(raw) > MAX_HTTP_ITEMS:
        raise Refused(
            413,
            f"{len(raw)} items in one request; the endpoint scores at most {MAX_HTTP_ITEMS} "
            "(actors.reward.MAX_HTTP_ITEMS): send them in several requests",
        )
    items = []
    for i, item in enumerate(raw):
        where = "" if single else f"items[{i}]."
        if not isinstance(item, dict):
            raise Refused(
                400, f"{where or 'the body'} must be an object, got {type(item).__name__}"
            )
        for key in ("response", "reference_answer"):
            if not isinstance(item.get(key), str):
                raise Refused(400, f"{where}{key} must be a string, got {echo(item.get(key))}")
        prompt, row, num_images = (
            item.get("prompt", ""),
            item.get("row", {}),
            item.get("num_images", 0),
        )
        if not isinstance(prompt, str):
            raise Refused(400, f"{where}prompt must be a string, got {echo(prompt)}")
        if not isinstance(row, dict):
            raise Refused(400, f"{where}row must be an object, got {echo(row)}")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
            raise Refused(400, f"{where}num_images must be an integer >= 0, got {echo(num_images)}")
        items.append(
            ScoreRequest(item["response"], item["reference_answer"], prompt, row, num_images)
        )
    return items, single


class RewardEndpoint(RewardWorker):
    """The reward role's HTTP endpoint: the application's ingress, one replica of its own
    (Serve's proxy routes ``reward.http_route`` here), scoring with the same function as the
    workers, so HTTP callers never occupy a :class:`RewardWorker` the trainer waits for.

    ``token`` is the bearer token callers must send ("" = none: only for a proxy on
    loopback, which :class:`RewardPool` checks). ``workers`` is the handle of the
    :class:`RewardWorker` deployment; it is bound only so that both deployments form one
    Serve application (started, listed and deleted together), and never called.
    """

    def __init__(self, cfg: RewardConfig, run_id: str, token: str, workers: Any) -> None:
        super().__init__(cfg, run_id, processes=HTTP_CONCURRENCY)  # one per request in flight
        self._token = token.encode()
        del workers

    def _authorized(self, header: str) -> bool:
        if not self._token:
            return True
        scheme, _, given = header.partition(" ")
        # compare_digest: the time taken does not depend on how much of the token matched
        given_token = given.strip().encode()
        return scheme.lower() == "bearer" and hmac.compare_digest(given_token, self._token)

    async def _read_body(self, request: Any) -> bytes:
        """The body, refused (413) as soon as it is known to exceed ``max_request_kb``: by its
        ``Content-Length`` before any of it is read, else by counting as chunks arrive."""
        limit = self.cfg.max_request_kb * 1024
        too_big = (
            f"the body is larger than reward.max_request_kb={self.cfg.max_request_kb} KiB "
            f"({limit} bytes); send fewer or shorter items per request"
        )
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise Refused(400, f"Content-Length {echo(declared)} is not a byte count")
            if int(declared) > limit:
                raise Refused(413, too_big)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, too_big)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _answer(self, request: Any) -> tuple[int, Any]:
        body = await self._read_body(request)
        try:
            parsed = json.loads(body)
        except ValueError as exc:  # also UnicodeDecodeError
            raise Refused(400, f"the body is not JSON: {echo(str(exc))}") from exc
        except RecursionError as exc:  # "[[[[..." nested deeper than Python recurses
            raise Refused(400, "the body's JSON is nested too deep") from exc
        items, single = parse_score_body(parsed)
        stop = threading.Event()
        try:
            results = await asyncio.to_thread(self._score, items, stop)
        except asyncio.CancelledError:  # past the deadline: score no further item
            stop.set()
            raise
        out = [dataclasses.asdict(r) for r in results]
        return 200, (out[0] if single else {"results": out})

    async def __call__(self, request: Any) -> Any:
        """``POST <reward.http_route>`` with a JSON body ``{"response": str,
        "reference_answer": str}`` (optionally ``"prompt"``, ``"row"``, ``"num_images"``:
        :func:`parse_score_body`) → ``{"reward", "accuracy", "format", "error", "scores"}``
        (``scores``: the named scores), or
        ``{"items": [{...}, ...]}`` (at most :data:`MAX_HTTP_ITEMS`) → ``{"results": [...]}``
        in order. Errors answer ``{"error": message}`` (what was wrong, at most 200
        characters of the input echoed): 401 without the bearer token, 413 for a body over
        ``reward.max_request_kb`` or too many items, 400 for a body that is not such JSON,
        504 when not answered within ``reward.request_timeout_s`` seconds."""
        from starlette.responses import JSONResponse

        headers = {}
        try:
            if not self._authorized(request.headers.get("authorization", "")):
                headers["WWW-Authenticate"] = 'Bearer realm="shuffle-r1 reward"'
                raise Refused(
                    401,
                    "missing or wrong bearer token: send 'Authorization: Bearer <token>' with "
                    f"the endpoint's token (reward.http_token, or ${TOKEN_ENV} where the "
                    "trainer runs)",
                )
            status, payload = await asyncio.wait_for(
                self._answer(request), self.cfg.request_timeout_s
            )
        except Refused as exc:
            status, payload = exc.status, {"error": exc.message}
        except TimeoutError:
            status = 504
            payload = {
                "error": f"not answered within reward.request_timeout_s="
                f"{self.cfg.request_timeout_s:g} s (reading the body and scoring); its "
                "remaining items were dropped: send fewer items per request"
            }
        return JSONResponse(payload, status_code=status, headers=headers)


REWARD_DEPLOYMENT = "RewardWorker"
ENDPOINT_DEPLOYMENT = "RewardEndpoint"


class RewardPool:
    """The reward role: a Ray Serve application of ``cfg.num_workers`` :class:`RewardWorker`
    replicas (no CPU reserved: scoring is light), which the trainer reaches by handle, and one
    :class:`RewardEndpoint` replica, the ingress, which serves outside verifiers and
    evaluation scripts over HTTP at ``<url>`` (``POST``, JSON); with
    ``reward.http_endpoint=false`` there is no endpoint and ``url`` is None.

    :meth:`score` splits the requests into contiguous chunks, one per worker; the chunk of a
    worker that dies is re-sent (at most ``max_resends`` times) and Serve replaces it.

    The endpoint's token is ``cfg.http_token``, else ``$SHUFFLE_R1_REWARD_TOKEN`` as this
    process sees it. Raises ``ValueError`` when Serve's proxy listens on a non-loopback
    address (``reward.http_host``, or whatever Serve was first started with) and no token is
    set: the endpoint would score for anyone who reaches it.
    """

    def __init__(self, cfg: RewardConfig, run_id: str, max_resends: int = 3) -> None:
        from ray import serve

        from actors.serving import LOGGING, ensure_serve, proxy_host

        self.cfg = cfg
        self.app = f"{run_id}-reward"
        self.max_resends = max_resends
        self.resent = 0
        base = ensure_serve(cfg.http_host, cfg.http_port)
        token = cfg.http_token or os.environ.get(TOKEN_ENV, "")
        bound = proxy_host()
        if not token and not is_loopback(bound):
            raise ValueError(
                f"Ray Serve's HTTP proxy listens on {bound} (reward.http_host="
                f"{cfg.http_host}), beyond this machine, and the reward endpoint has no token: "
                f"set ${TOKEN_ENV} (or reward.http_token), or bind it to 127.0.0.1"
            )
        shared = dataclasses.replace(cfg, http_token="")  # the token goes to the endpoint only
        workers = serve.deployment(
            name=REWARD_DEPLOYMENT,
            num_replicas=cfg.num_workers,
            ray_actor_options={"num_cpus": 0},
            max_ongoing_requests=1,  # one chunk per replica at a time: an even spread
            health_check_period_s=HEALTH_CHECK_PERIOD_S,
            # a stopping replica looks for requests still running every 0.5 s, not Serve's 2 s
            graceful_shutdown_wait_loop_s=0.5,
        )(RewardWorker)
        endpoint = serve.deployment(
            name=ENDPOINT_DEPLOYMENT,
            num_replicas=1,
            ray_actor_options={"num_cpus": 0},
            max_ongoing_requests=HTTP_CONCURRENCY,
            max_queued_requests=HTTP_QUEUE,  # beyond: Serve answers 503 at once
            health_check_period_s=HEALTH_CHECK_PERIOD_S,
            graceful_shutdown_wait_loop_s=0.5,
        )(RewardEndpoint)
        if cfg.http_endpoint:
            serve.run(
                endpoint.bind(shared, run_id, token, workers.bind(shared, run_id)),
                name=self.app,
                route_prefix=cfg.http_route,
                logging_config=LOGGING,
            )
            self.url: str | None = base + cfg.http_route
        else:  # the workers alone, reached by handle: no HTTP route, no endpoint replica
            serve.run(
                workers.bind(shared, run_id),
                name=self.app,
                route_prefix=None,
                logging_config=LOGGING,
            )
            self.url = None
        self.handle = serve.get_deployment_handle(REWARD_DEPLOYMENT, self.app)
        logger.info(
            "reward: %d workers, HTTP endpoint %s",
            cfg.num_workers,
            f"{self.url} ({'bearer token required' if token else 'no token: this machine only'})"
            if self.url
            else "off (reward.http_endpoint=false)",
        )

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
