"""The replay buffer's gRPC servicer: validates requests, calls the logic and the store.

Status codes: INVALID_ARGUMENT for a malformed request (the message names the field and
echoes at most 200 characters of the value);
NOT_FOUND for an unknown run or an empty step (Sample with ``expected_groups == 0``, Stats);
FAILED_PRECONDITION for a spec that differs from the run's, an evicted step or fewer groups
than ``expected_groups`` (none at all included: the data was lost, e.g. Redis restarted
without persistence; the message names the run, the step and both counts); ALREADY_EXISTS
for a key that holds different content; RESOURCE_EXHAUSTED beyond the message size limit;
UNAUTHENTICATED without the shared token (:mod:`.auth`); UNAVAILABLE when Redis fails (retry:
every write is idempotent); ABORTED when a step's groups were evicted or dropped while a
Sample read them (retry). A refused call changes nothing stored. Nothing else is answered: an
unexpected error would be INTERNAL, and the fuzz tests (``tests/faults``) check it never is.

Stale data (docs/architecture.md §3, "Weight versions"): a group whose oldest rollout's
weight_version is below the run's newest version minus ``max_staleness`` is *dropped and
counted* at put (status PUT_STATUS_STALE, not an error: a lagging rollout worker is normal
operation and the other groups of the request still count), and dropped (deleted) and
counted at sample for the request's policy_version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar, cast

import grpc
import redis
import torch
from google.protobuf.message import DecodeError, Message

from protos import replay_buffer_pb2 as pb
from services.embedded_redis import redact
from services.replay_buffer import logic
from services.replay_buffer.metrics import BufferMetrics
from services.replay_buffer.store import (
    DUPLICATE,
    EVICTED,
    STALE,
    STORED,
    BufferStore,
    ChangedError,
    ConflictError,
    NotFoundError,
    PreconditionError,
    SpecChangedError,
)
from shuffle_r1.algos import advantage_collapse_share, advantage_histogram, rollout_silence_ratio
from shuffle_r1.config import AlgorithmConfig
from shuffle_r1.limits import RUN_ID_PATTERN, echo

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ReplayBuffer"].full_name
MAX_HISTOGRAM_BINS = 1024  # Stats: more would only let a request allocate without bound


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
            run_id, packed = logic.validate_put(request)
            requested = self._requested_spec(request, run_id)
        except ValueError as exc:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
        stored = self.store.get_spec(run_id)
        spec = self._run_spec(run_id, requested, stored)
        for _attempt in range(2):
            try:
                logic.check_against_spec(request.groups, packed, spec)
            except ValueError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
            records = logic.prepare_groups(request.groups, spec, packed)
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
        response.advantages.extend(a for record in records for a in record.advantages)
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
        batch = logic.draw_batch(
            snapshot.payloads,
            spec,
            request.step,
            self.algo.collapse_tau,
            prompts_by_group=request.prompts_by_group,
        )
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
        body = b"".join([header.SerializeToString(), *batch.encoded, *batch.prompts])
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
