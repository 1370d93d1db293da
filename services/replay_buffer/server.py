"""The replay buffer's gRPC server: validates requests, calls the logic and the store.

Status codes: INVALID_ARGUMENT for a malformed request (the message names the field and
echoes at most 200 characters of the value);
NOT_FOUND for an unknown run or an empty step (Sample with ``expected_groups == 0``, Stats);
FAILED_PRECONDITION for a spec that differs from the run's, an evicted step or fewer groups
than ``expected_groups`` (none at all included: the data was lost, e.g. Redis restarted
without persistence; the message names the run, the step and both counts); ALREADY_EXISTS
for a key that holds different content; RESOURCE_EXHAUSTED beyond the message size limit;
UNAUTHENTICATED without the shared token; UNAVAILABLE when Redis fails (retry: every write
is idempotent); ABORTED when a step's groups were evicted or dropped while a Sample read
them (retry). A refused call changes nothing stored. Nothing else is answered: an
unexpected error would be INTERNAL, and the fuzz tests (``tests/faults``) check it never is.

Health: the standard ``grpc.health.v1.Health`` service answers SERVING while Redis accepts
a write (checked every ``buffer.health_check_s``) and NOT_SERVING while it does not answer
or refuses writes (``maxmemory`` reached under the noeviction policy, a read-only replica):
then every put would fail.

Stale data (docs/ALGORITHM.md; docs/DESIGN.md "Weight versions"): a group whose oldest rollout's
weight_version is below the run's newest version minus ``max_staleness`` is *dropped and
counted* at put (status PUT_STATUS_STALE, not an error: a lagging rollout worker is normal
operation and the other groups of the request still count), and dropped (deleted) and
counted at sample for the request's policy_version.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar, cast
from wsgiref.simple_server import WSGIServer

import grpc
import redis
import torch
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from protos import replay_buffer_pb2 as pb
from services.embedded_redis import PASSWORD_ENV, EmbeddedRedis, RedisTLS, redact
from services.replay_buffer import logic
from services.replay_buffer.client import TOKEN_ENV
from services.replay_buffer.store import (
    DUPLICATE,
    EVICTED,
    STALE,
    STORED,
    BufferStore,
    ChangedError,
    ConflictError,
    Held,
    NotFoundError,
    PreconditionError,
    SpecChangedError,
)
from shuffle_r1.algos import advantage_collapse_share, advantage_histogram, rollout_silence_ratio
from shuffle_r1.config import AlgorithmConfig, BufferConfig
from shuffle_r1.limits import RUN_ID_PATTERN, echo
from shuffle_r1.metric_catalog import BY_NAME

log = logging.getLogger(__name__)

_SERVICE = pb.DESCRIPTOR.services_by_name["ReplayBuffer"]
SERVICE_NAME = _SERVICE.full_name
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
_METHODS = tuple(m.name for m in _SERVICE.methods)
MAX_HISTOGRAM_BINS = 1024  # Stats: more would only let a request allocate without bound
_C = TypeVar("_C", Counter, Gauge, Histogram)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class BufferMetrics:
    """Prometheus metrics of one server, in their own registry: the ``role == "buffer"``
    entries of :mod:`shuffle_r1.metric_catalog`, with the catalog's names, kinds, labels and
    help texts (request latency with sub-millisecond buckets)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = self._counter("requests_total")  # method, code
        self.latency = self._metric(Histogram, "request_seconds", buckets=_LATENCY_BUCKETS)
        self.groups = self._counter("groups_put_total")  # outcome
        self.pairs_kept = self._counter("pairs_kept_total")
        self.pairs_dropped = self._counter("pairs_dropped_total")
        self.stale = self._counter("stale_dropped_total")  # where: put | sample
        self.evicted_steps = self._counter("evicted_steps_total")
        self.evicted_groups = self._counter("evicted_groups_total")
        self.samples = self._counter("samples_total")
        self.items = self._counter("items_sampled_total")
        self.shortfall = self._counter("abs_shortfall_total")
        self.skipped = self._counter("skipped_batches_total")
        self.redis_errors = self._counter("redis_errors_total")  # op: an RPC or "health"
        self.groups_stored = self._gauge("groups_stored")  # run
        self.rollouts_stored = self._gauge("rollouts_stored")  # run
        self.silence = self._gauge("rollout_silence_ratio")
        self.collapse = self._gauge("advantage_collapse_share")
        # Known label values start at 0, so a scrape shows them before the first event.
        for op in (*_METHODS, "health"):
            self.redis_errors.labels(op)
        for outcome in ("stored", "duplicate", "stale", "evicted"):
            self.groups.labels(outcome)
        for where in ("put", "sample"):
            self.stale.labels(where)

    def _metric(self, kind: type[_C], short: str, **options: Any) -> _C:
        spec = BY_NAME["shuffle_r1_buffer_" + short]
        return kind(spec.name, spec.help, spec.labels, registry=self.registry, **options)

    def _counter(self, short: str) -> Counter:
        return self._metric(Counter, short)

    def _gauge(self, short: str) -> Gauge:
        return self._metric(Gauge, short)

    def set_held(self, run_id: str, held: Held) -> None:
        """Set the stored-size gauges of ``run_id`` from what the store reported."""
        self.groups_stored.labels(run_id).set(held.groups)
        self.rollouts_stored.labels(run_id).set(held.rollouts)

    def forget_run(self, run_id: str) -> None:
        """Remove the stored-size series of a dropped run."""
        self.groups_stored.remove(run_id)
        self.rollouts_stored.remove(run_id)


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ReplayBufferServicer:
    """The four RPCs of ``shuffle_r1.buffer.v1.ReplayBuffer`` over a :class:`BufferStore`.

    Requests arrive as bytes and are parsed here, so a request that does not parse, or
    carries fields of the wrong type, is answered INVALID_ARGUMENT naming the field.
    """

    def __init__(
        self,
        store: BufferStore,
        algo: AlgorithmConfig,
        metrics: BufferMetrics,
        max_message_bytes: int,
    ) -> None:
        self.store = store
        self.algo = algo
        self.metrics = metrics
        self.max_message_bytes = max_message_bytes

    def handlers(self) -> grpc.GenericRpcHandler:
        methods: dict[str, Callable[[bytes], bytes]] = {
            "PutGroups": self.put_groups,
            "Sample": self.sample,
            "Stats": self.stats,
            "DropRun": self.drop_run,
        }
        return grpc.method_handlers_generic_handler(
            SERVICE_NAME,
            {
                name: grpc.unary_unary_rpc_method_handler(self._wrap(name, fn))
                for name, fn in methods.items()
            },
        )

    def _wrap(self, method: str, fn: Callable[[bytes], bytes]) -> Callable[..., bytes]:
        latency = self.metrics.latency.labels(method)

        def handle(raw: bytes, context: grpc.ServicerContext) -> bytes:
            start = time.perf_counter()
            code, message = grpc.StatusCode.OK, ""
            try:
                return fn(raw)
            except _Abort as exc:
                code, message = exc.code, exc.message
            except redis.RedisError as exc:
                self.metrics.redis_errors.labels(method).inc()
                code = grpc.StatusCode.UNAVAILABLE
                message = (
                    f"Redis at {redact(self.store.url)} failed during {method}: "
                    f"{type(exc).__name__}: {exc}; retry (puts are idempotent)"
                )
                log.warning("%s", message)
            except Exception:
                log.exception("%s failed", method)
                code, message = grpc.StatusCode.INTERNAL, f"{method} failed; see the server log"
            finally:
                latency.observe(time.perf_counter() - start)
                self.metrics.requests.labels(method, code.name).inc()
            context.abort(code, message)
            raise AssertionError("unreachable: abort raises")

        return handle

    # ---- PutGroups ----

    def put_groups(self, raw: bytes) -> bytes:
        request = _parse(pb.PutGroupsRequest, raw)
        try:
            run_id = logic.validate_put(request)
            requested = self._requested_spec(request, run_id)
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        stored = self.store.get_spec(run_id)
        spec = self._run_spec(run_id, requested, stored)
        for _attempt in range(2):
            try:
                logic.check_against_spec(request.groups, spec)
            except ValueError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
            records = logic.prepare_groups(request.groups, spec)
            try:
                outcome = self.store.put(run_id, spec.SerializeToString(), records)
                break
            except ConflictError as exc:
                raise _Abort(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from exc
            except SpecChangedError as exc:
                # The run was created by a concurrent put since we read its spec.
                spec = self._run_spec(run_id, requested, exc.stored_spec)
        else:
            raise _Abort(grpc.StatusCode.ABORTED, f"run {run_id!r} changed during the put; retry")

        statuses = cast("list[pb.PutStatus]", outcome.statuses)  # the same numbers
        response = pb.PutGroupsResponse(statuses=statuses, spec=spec)
        for record, status in zip(records, outcome.statuses, strict=True):
            if status == STORED:
                response.stored += 1
                response.pairs_kept += record.pairs_kept
                response.pairs_dropped += record.pairs_dropped
        response.duplicates = outcome.statuses.count(DUPLICATE)
        response.stale = outcome.statuses.count(STALE)
        response.evicted = outcome.statuses.count(EVICTED)
        response.evicted_steps = len(outcome.evicted_steps)
        m = self.metrics
        for outcome_name, count in (
            ("stored", response.stored),
            ("duplicate", response.duplicates),
            ("stale", response.stale),
            ("evicted", response.evicted),
        ):
            m.groups.labels(outcome_name).inc(count)
        m.stale.labels("put").inc(response.stale)
        m.pairs_kept.inc(response.pairs_kept)
        m.pairs_dropped.inc(response.pairs_dropped)
        m.evicted_steps.inc(len(outcome.evicted_steps))
        m.evicted_groups.inc(outcome.evicted_groups)
        m.set_held(run_id, outcome.held)
        return response.SerializeToString()

    def _requested_spec(
        self, request: pb.PutGroupsRequest | pb.SampleRequest, run_id: str
    ) -> pb.RunSpec | None:
        """The request's RunSpec resolved against the server defaults, or None if it has
        none. Raises ``ValueError`` for an invalid spec."""
        if not request.HasField("spec"):
            return None
        return logic.resolve_spec(request.spec, self.algo, run_id)

    def _run_spec(
        self, run_id: str, requested: pb.RunSpec | None, stored: bytes | None
    ) -> pb.RunSpec:
        """The spec a request runs under: the stored one, else the requested or default one.

        Raises:
            _Abort: FAILED_PRECONDITION if the request asks for settings the run lacks.
        """
        if stored is None:
            return requested or logic.resolve_spec(None, self.algo, run_id)
        spec = pb.RunSpec.FromString(stored)
        if requested is not None and requested != spec:
            raise _spec_mismatch(run_id, spec, requested)
        return spec

    # ---- Sample ----

    def sample(self, raw: bytes) -> bytes:
        request = _parse(pb.SampleRequest, raw)
        run_id = request.run_id
        try:
            logic.check_known_fields(request, "")
            _check_run_id(run_id, "run_id")
            if not 0 <= request.step < logic.MAX_COUNTER:
                raise ValueError(f"step={request.step} must be in [0, {logic.MAX_COUNTER})")
            if not 0 <= request.policy_version < logic.MAX_COUNTER:
                raise ValueError(
                    f"policy_version={request.policy_version} must be in [0, {logic.MAX_COUNTER})"
                )
            if request.expected_groups < 0:
                raise ValueError(f"expected_groups={request.expected_groups} must be >= 0")
            requested = self._requested_spec(request, run_id)
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        try:
            snapshot = self.store.sample(
                run_id,
                request.step,
                request.policy_version,
                request.expected_groups,
                spec=requested.SerializeToString() if requested is not None else b"",
            )
        except SpecChangedError as exc:
            assert requested is not None
            raise _spec_mismatch(run_id, pb.RunSpec.FromString(exc.stored_spec), requested) from exc
        except NotFoundError as exc:
            raise _Abort(grpc.StatusCode.NOT_FOUND, str(exc)) from exc
        except PreconditionError as exc:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
        except ChangedError as exc:
            raise _Abort(grpc.StatusCode.ABORTED, str(exc)) from exc
        self.metrics.set_held(run_id, snapshot.held)
        spec = pb.RunSpec.FromString(snapshot.spec)
        batch = logic.draw_batch(snapshot.payloads, spec, request.step, self.algo.collapse_tau)
        header = pb.SampleResponse(
            run_id=run_id,
            step=request.step,
            groups=len(batch.groups),
            pairs_total=batch.pairs_total,
            shortfall=batch.shortfall,
            skipped=batch.skipped,
            stale_dropped=snapshot.stale_dropped,
            spec=spec,
            rollout_silence_ratio=batch.rollout_silence_ratio,
            advantage_collapse_share=batch.advantage_collapse_share,
            round_sizes=batch.round_sizes,
        )
        for g in batch.groups:
            if g.images:
                prompt_id = pb.SampledItem.FromString(g.item_head).prompt_id
                header.images[prompt_id].images.extend(g.images)
        body = b"".join([header.SerializeToString(), *batch.encoded])
        if len(body) > self.max_message_bytes:
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the batch of step {request.step} is {len(body) / 2**20:.1f} MiB, over the "
                f"server's max message size of {self.max_message_bytes / 2**20:.0f} MiB "
                "(buffer.max_message_mb)",
            )
        m = self.metrics
        m.samples.inc()
        m.items.inc(batch.item_count)
        m.stale.labels("sample").inc(snapshot.stale_dropped)
        m.shortfall.inc(batch.shortfall)
        m.skipped.inc(int(batch.skipped))
        if batch.item_count:
            m.silence.set(batch.rollout_silence_ratio)
            m.collapse.set(batch.advantage_collapse_share)
        return body

    # ---- Stats ----

    def stats(self, raw: bytes) -> bytes:
        request = _parse(pb.StatsRequest, raw)
        try:
            logic.check_known_fields(request, "")
            _check_run_id(request.run_id, "run_id")
            if not 0 <= request.histogram_bins <= MAX_HISTOGRAM_BINS:
                raise ValueError(
                    f"histogram_bins={request.histogram_bins} must be in [0, {MAX_HISTOGRAM_BINS}]"
                )
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        try:
            contents = self.store.contents(request.run_id)
        except NotFoundError as exc:
            raise _Abort(grpc.StatusCode.NOT_FOUND, str(exc)) from exc
        response = pb.StatsResponse(
            run_id=request.run_id,
            spec=pb.RunSpec.FromString(contents.spec),
            policy_version=contents.policy_version,
            cursor=pb.Cursor(
                last_sampled_step=contents.last_sampled_step,
                samples_served=contents.samples_served,
            ),
            counters=pb.Counters(**contents.counters),
        )
        wanted = request.step if request.HasField("step") else None
        chosen = None
        for step in contents.steps:
            summaries = [pb.GroupSummary.FromString(s) for s in step.summaries]
            response.steps.append(
                pb.StepStats(
                    step=step.step,
                    groups_stored=step.groups_stored,
                    groups_accepted=step.groups_accepted,
                    rollouts_put=sum(len(s.advantages) for s in summaries),
                    rollouts_stored=sum(len(s.kept) for s in summaries),
                    pairs_kept=sum(s.pairs_kept for s in summaries),
                    bytes=step.memory_bytes,
                )
            )
            if wanted is None or step.step == wanted:  # None: the newest (steps ascend)
                chosen = (step.step, summaries)
        if chosen is None and wanted is not None:
            raise _Abort(
                grpc.StatusCode.NOT_FOUND,
                f"run {request.run_id!r} holds no step {request.step}; it holds "
                f"{[s.step for s in contents.steps]}",
            )
        if chosen is not None:
            self._diagnostics(response, *chosen, request.histogram_bins or 24)
        return response.SerializeToString()

    def _diagnostics(
        self, response: pb.StatsResponse, step: int, summaries: list[pb.GroupSummary], bins: int
    ) -> None:
        """Fill the §5 diagnostics of ``step`` from its group summaries."""
        advantages = torch.tensor([a for s in summaries for a in s.advantages], dtype=torch.float64)
        truncated = torch.tensor([t for s in summaries for t in s.truncated], dtype=torch.bool)
        kept = torch.tensor(
            [offset + j for offset, s in zip(_offsets(summaries), summaries, strict=True)
             for j in s.kept],
            dtype=torch.long,
        )  # fmt: skip
        counts, edges = advantage_histogram(advantages, bins=bins)
        response.diagnostics_step = step
        response.histogram_counts.extend(counts.tolist())
        response.histogram_edges.extend(edges.tolist())
        response.rollout_silence_ratio = rollout_silence_ratio(advantages, truncated)
        response.advantage_collapse_share = advantage_collapse_share(
            advantages, self.algo.collapse_tau
        )
        response.kept_rollout_silence_ratio = rollout_silence_ratio(
            advantages[kept], truncated[kept]
        )

    # ---- DropRun ----

    def drop_run(self, raw: bytes) -> bytes:
        request = _parse(pb.DropRunRequest, raw)
        try:
            logic.check_known_fields(request, "")
            _check_run_id(request.run_id, "run_id")
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        existed, groups = self.store.drop(request.run_id)
        self.metrics.forget_run(request.run_id)
        log.info("dropped run %r (%d groups)", request.run_id, groups)
        return pb.DropRunResponse(existed=existed, groups_deleted=groups).SerializeToString()


def _spec_mismatch(run_id: str, spec: pb.RunSpec, requested: pb.RunSpec) -> _Abort:
    """FAILED_PRECONDITION: the request asks for other settings than the run has."""
    return _Abort(
        grpc.StatusCode.FAILED_PRECONDITION,
        f"run {run_id!r} runs with spec {logic.spec_text(spec)}, the request asks "
        f"for {logic.spec_text(requested)}: use the run's settings, or a new run id",
    )


def _offsets(summaries: list[pb.GroupSummary]) -> list[int]:
    out, total = [], 0
    for s in summaries:
        out.append(total)
        total += len(s.advantages)
    return out


_M = TypeVar("_M", bound=Message)


def _parse(cls: type[_M], raw: bytes) -> _M:
    try:
        return cls.FromString(raw)
    except DecodeError as exc:
        raise _Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid {cls.DESCRIPTOR.full_name}: {exc}",
        ) from exc


def _check_run_id(run_id: str, field: str) -> None:
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise ValueError(f"{field}={echo(run_id)} must match {RUN_ID_PATTERN.pattern}")


class _TokenInterceptor(grpc.ServerInterceptor):
    """Requires metadata ``authorization: Bearer <token>`` on every call but Health."""

    def __init__(self, token: str, metrics: BufferMetrics) -> None:
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

        def deny(raw: bytes, context: grpc.ServicerContext) -> None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong token: send metadata 'authorization: Bearer <token>'",
            )

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        if details.method.startswith(_HEALTH_PREFIX):
            return continuation(details)
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and hmac.compare_digest(
                value.encode() if isinstance(value, str) else value, self._expected
            ):
                return continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        self._metrics.requests.labels(method, grpc.StatusCode.UNAUTHENTICATED.name).inc()
        return self._deny


def serve(
    cfg: BufferConfig,
    algo: AlgorithmConfig,
    *,
    registry: CollectorRegistry | None = None,
    max_workers: int = 16,
) -> tuple[BufferServer, int]:
    """Start a replay buffer server; return it (started) and its port.

    Binds ``cfg.host:cfg.port`` (port 0 = a free one; the default host is loopback) without
    SO_REUSEPORT, so a port another process holds is an error, not a shared port. TLS if
    ``cfg.tls_cert`` and ``cfg.tls_key`` (PEM file paths) are set; with ``cfg.tls_client_ca``
    too, a client must present a certificate that CA signed (mutual TLS). Every call but
    Health needs the shared token ``cfg.auth_token``, or ``$SHUFFLE_R1_BUFFER_TOKEN`` if that
    is empty (no token if both are). Redis is ``cfg.redis_url`` with ``cfg.redis_tls_*``
    (password: see :func:`services.embedded_redis.redis_client`). Algorithm defaults of new
    runs come from ``algo``. Metrics go to ``registry`` (a private one if None), served as
    Prometheus ``/metrics`` on ``cfg.host:cfg.metrics_port`` if that is > 0.

    A thread writes to Redis every ``cfg.health_check_s`` seconds (:meth:`BufferStore.probe`)
    and sets the health status (service "" and the ReplayBuffer service) to NOT_SERVING
    while the write fails and to SERVING when it succeeds again. ``server.stop(grace)``
    stops it all: the event it returns is set once the gRPC server, the thread and the
    metrics endpoint have ended.

    Raises:
        RuntimeError: a PEM file of the config does not exist; Redis does not answer at
            ``cfg.redis_url``, refuses the password or the TLS handshake; the port (e.g.
            held by another buffer) or the metrics port cannot be bound;
            ``cfg.tls_client_ca`` without ``cfg.tls_cert``. The message names the key, the
            (redacted) URL or the address.
    """
    url = redact(cfg.redis_url)
    keys = ("tls_cert", "tls_key", "tls_client_ca", "redis_tls_ca_cert", "redis_tls_cert",
            "redis_tls_key")  # fmt: skip
    for key in keys:
        path = getattr(cfg, key)
        if path and not Path(path).is_file():
            raise RuntimeError(f"buffer.{key}={path!r}: no such file (a PEM file is expected)")
    if cfg.tls_client_ca and not cfg.tls_cert:
        raise RuntimeError(
            "buffer.tls_client_ca is set but buffer.tls_cert is not: client certificates are "
            "checked only over TLS; set buffer.tls_cert and buffer.tls_key too"
        )
    try:
        store = BufferStore(
            cfg.redis_url,
            tls=RedisTLS(cfg.redis_tls_ca_cert, cfg.redis_tls_cert, cfg.redis_tls_key),
            keep_steps=cfg.keep_steps,
            max_staleness=cfg.max_staleness,
        )
    except ValueError as exc:
        raise RuntimeError(f"the replay buffer cannot use Redis: {exc}") from exc
    try:
        store.ping()
    except redis.AuthenticationError as exc:
        store.close()
        raise RuntimeError(
            f"Redis at {url} refused to authenticate the replay buffer ({exc}): give its "
            f"password in buffer.redis_url (redis://:PASSWORD@host:port/db) or ${PASSWORD_ENV}"
        ) from exc
    except redis.RedisError as exc:
        store.close()
        tls_hint = (
            "; check buffer.redis_tls_ca_cert (the CA of Redis's certificate), and "
            "redis_tls_cert/redis_tls_key if Redis asks for a client certificate"
            if cfg.redis_url.startswith("rediss://")
            else ""
        )
        raise RuntimeError(
            f"the replay buffer cannot reach Redis at {url}: {exc}; start one or pass "
            f"--redis-url (or 'embedded'){tls_hint}"
        ) from exc
    token = cfg.auth_token or os.environ.get(TOKEN_ENV, "")
    metrics = BufferMetrics(registry)
    max_bytes = cfg.max_message_mb * 2**20
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="buffer"),
        interceptors=[_TokenInterceptor(token, metrics)] if token else [],
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            # gRPC sets SO_REUSEPORT by default: a second server on the port would start
            # and silently take part of the traffic
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers(
        (ReplayBufferServicer(store, algo, metrics, max_bytes).handlers(),)
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{cfg.host}:{cfg.port}"
    try:
        if cfg.tls_cert:
            credentials = grpc.ssl_server_credentials(
                [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
                root_certificates=(
                    Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
                ),
                require_client_auth=bool(cfg.tls_client_ca),
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise RuntimeError("no port bound")
    except RuntimeError as exc:  # grpcio raises, or returns 0, for a port it cannot bind
        store.close()
        raise RuntimeError(
            f"the replay buffer cannot bind {address} ({exc}): is another process (another "
            "buffer?) listening there? Choose another buffer.port, or 0 for a free one"
        ) from exc
    exporter = None
    if cfg.metrics_port:
        try:
            exporter, _ = start_http_server(
                cfg.metrics_port, addr=cfg.host, registry=metrics.registry
            )
        except OSError as exc:
            server.stop(None)
            store.close()
            raise RuntimeError(
                f"the replay buffer cannot serve metrics on {cfg.host}:{cfg.metrics_port}: "
                f"{exc} (buffer.metrics_port)"
            ) from exc
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    watcher = threading.Thread(
        target=_watch_redis,
        args=(server, store, health_servicer, metrics, cfg.health_check_s, exporter),
        name="buffer-health",
        daemon=True,
    )
    watcher.start()
    log.info(
        "replay buffer on %s:%d (Redis %s, keep_steps=%d, max_staleness=%d, tls=%s, "
        "client certificates=%s, token=%s, metrics=%s)",
        cfg.host, port, url, cfg.keep_steps, cfg.max_staleness, bool(cfg.tls_cert),
        bool(cfg.tls_client_ca), bool(token),
        f"{cfg.host}:{cfg.metrics_port}" if exporter else "off",
    )  # fmt: skip
    return BufferServer(server, watcher), port


class BufferServer:
    """A running replay buffer: the gRPC server and the thread that watches Redis (and,
    when it ends, stops the metrics endpoint and closes the Redis connections)."""

    def __init__(self, server: grpc.Server, watcher: threading.Thread) -> None:
        self.grpc_server = server
        self._watcher = watcher

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving; in-flight calls get ``grace`` seconds (None: they are cancelled).
        The returned event is set when everything has ended."""
        stopped = threading.Event()
        terminated = self.grpc_server.stop(grace)

        def finish() -> None:
            terminated.wait()
            self._watcher.join()
            stopped.set()

        threading.Thread(target=finish, name="buffer-stop", daemon=True).start()
        return stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped, or ``timeout``; True if it timed out."""
        return bool(self.grpc_server.wait_for_termination(timeout))


def _watch_redis(
    server: grpc.Server,
    store: BufferStore,
    health_servicer: health.HealthServicer,
    metrics: BufferMetrics,
    period_s: float,
    exporter: WSGIServer | None,
) -> None:
    """Until ``server`` terminates: write to Redis every ``period_s`` and keep the health
    status in step with whether it succeeds. Then stop the metrics endpoint and close the
    store."""
    serving = True
    while server.wait_for_termination(timeout=period_s):  # True: timed out, still running
        try:
            store.probe(expire_s=max(5.0, 3 * period_s))
            answers, reason = True, ""
        except redis.RedisError as exc:
            metrics.redis_errors.labels("health").inc()
            answers, reason = False, f"{type(exc).__name__}: {exc}"
        if answers != serving:
            serving = answers
            status = health_pb2.HealthCheckResponse.SERVING if answers else (
                health_pb2.HealthCheckResponse.NOT_SERVING
            )  # fmt: skip
            for service in ("", SERVICE_NAME):
                health_servicer.set(service, status)
            if answers:
                log.info("Redis at %s accepts writes again: health SERVING", redact(store.url))
            else:
                log.warning(
                    "Redis at %s does not accept a write (%s): health NOT_SERVING",
                    redact(store.url), reason,
                )  # fmt: skip
    if exporter is not None:
        exporter.shutdown()
        exporter.server_close()
    store.close()


def start_embedded_redis(cfg: BufferConfig) -> tuple[BufferConfig, EmbeddedRedis | None]:
    """For ``redis_url == "embedded"``: start a private Redis; return the config pointing at
    it and the handle (stop it with ``close()``). Otherwise ``(cfg, None)``. The embedded
    Redis keeps no data on disk: it lives as long as its owner.
    """
    if cfg.redis_url != "embedded":
        return cfg, None
    embedded = EmbeddedRedis().start()
    return replace(cfg, redis_url=embedded.url), embedded
