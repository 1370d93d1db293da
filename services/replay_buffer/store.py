"""Redis storage of the replay buffer: one Lua script per operation (``lua/``), each atomic.

Keys of a run share the prefix ``shuffle_r1:buffer:{<run_id>}:`` (the braces are a Redis
Cluster hash tag: a run lives in one slot):

| key | type | holds |
|---|---|---|
| ``run`` | hash | ``spec`` (RunSpec bytes), ``policy_version``, ``evicted_below``, counters, |
| | | ``held_groups`` and ``held_rollouts`` (held now, for the stored-size gauges) |
| ``steps`` | sorted set | the steps held, score = step |
| ``cursor`` | hash | ``last_sampled_step``, ``samples_served`` |
| ``step:<s>:groups`` | hash | prompt_id → StoredGroup bytes (what Sample reads) |
| ``step:<s>:summary`` | hash | prompt_id → GroupSummary bytes (what Stats reads) |
| ``step:<s>:digest`` | hash | prompt_id → SHA-256 of the group as put (idempotency) |
| ``step:<s>:wv`` | hash | prompt_id → the group's oldest weight version (staleness) |
| ``step:<s>:kept`` | hash | prompt_id → rollouts of the group kept by PTS (held sizes) |

and one key of no run, ``shuffle_r1:buffer:health`` (a string with a few seconds' expiry),
which the health check writes to learn whether Redis accepts writes.

Values are protobuf bytes or decimal numbers, never pickle. Clients are built by
:func:`services.embedded_redis.redis_client` (password from the URL or the environment,
TLS). Redis failures surface as
``redis.RedisError``; the server turns them into UNAVAILABLE. Redis is the only state:
the in-process :class:`PayloadCache` only saves reading back what this process just wrote.

A put is written in chunks (:data:`PUT_CHUNK_GROUPS`, :data:`PUT_CHUNK_BYTES`), one script
call each, so that no call holds Redis (single-threaded: every other client waits) for more
than ~50 ms; :meth:`BufferStore.put` says what that keeps of a put's atomicity.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from services.embedded_redis import RedisTLS, redis_client
from shuffle_r1.limits import echo

# Outcome of one group of a put; the numbers are PutStatus values in the proto.
STORED, DUPLICATE, STALE, EVICTED = 1, 2, 3, 4

# Groups and bytes (StoredGroup + GroupSummary) per script call of a put, so one call holds
# Redis ~20-40 ms, under the ~50 ms budget with a margin. Measured with
# bench/buffer_chunking.py on the 2-core development machine (Redis 7.0, other jobs
# running): put.lua takes 40-80 us per small group plus 4-9 ms per MB of payload; check.lua
# ~2 us per group. Unchunked, 50,000 small groups held Redis 3.1 s, 1000 groups of 16 x 512
# tokens (34 MB) 0.2-0.8 s.
PUT_CHUNK_GROUPS = 250
PUT_CHUNK_BYTES = 4 * 2**20
CHECK_CHUNK_GROUPS = 5000
HEALTH_KEY = "shuffle_r1:buffer:health"

COUNTERS = (
    "groups_stored",
    "duplicates",
    "stale_at_put",
    "evicted_at_put",
    "stale_at_sample",
    "evicted_steps",
    "evicted_groups",
    "pairs_kept",
    "pairs_dropped",
)

# One Lua script per operation (ARGV and replies documented at the top of each), read
# once here; redis-py runs each with EVALSHA, loading it on NOSCRIPT.
_LUA = Path(__file__).with_name("lua")
_SCRIPTS = {
    name: (_LUA / f"{name}.lua").read_text(encoding="utf-8")
    for name in ("check", "put", "sample", "drop")
}


class NotFoundError(LookupError):
    """The run, or the step of a run, holds nothing (gRPC NOT_FOUND)."""


class PreconditionError(RuntimeError):
    """The request contradicts the stored state (gRPC FAILED_PRECONDITION)."""


class ConflictError(RuntimeError):
    """A key already holds a group with different content (gRPC ALREADY_EXISTS)."""


class ChangedError(RuntimeError):
    """The step changed between two reads of one call (gRPC ABORTED); retry the call."""


class SpecChangedError(RuntimeError):
    """The run's stored spec differs from the one the request was computed with."""

    def __init__(self, stored_spec: bytes) -> None:
        super().__init__("the run's stored spec changed")
        self.stored_spec = stored_spec


@dataclass(frozen=True)
class GroupRecord:
    """One group as written by :meth:`BufferStore.put`: its key, identity and values."""

    step: int
    prompt_id: str
    digest: bytes  # SHA-256 of the group as put
    oldest_weight_version: int
    pairs_kept: int
    pairs_dropped: int
    payload: bytes  # StoredGroup
    summary: bytes  # GroupSummary
    rollouts_kept: int  # rollouts of the group kept by PTS (all of them under grpo)
    advantages: tuple[float, ...] = ()  # GRPO advantage of each of its n rollouts (§1)


@dataclass(frozen=True)
class Held:
    """What a run holds in Redis now: groups and their rollouts kept by PTS."""

    groups: int
    rollouts: int


@dataclass(frozen=True)
class PutOutcome:
    statuses: list[int]  # STORED | DUPLICATE | STALE | EVICTED, one per record
    evicted_steps: list[int]
    evicted_groups: int
    held: Held  # after the put


@dataclass(frozen=True)
class StepSnapshot:
    """The groups of one step as Sample reads them, after stale groups were dropped."""

    spec: bytes
    stale_dropped: int
    payloads: list[bytes]  # StoredGroup bytes in ascending prompt_id order
    held: Held  # what the run holds after the stale groups were dropped


@dataclass(frozen=True)
class StepContents:
    step: int
    groups_stored: int
    groups_accepted: int
    memory_bytes: int
    summaries: list[bytes]  # GroupSummary bytes in ascending prompt_id order


@dataclass(frozen=True)
class RunContents:
    spec: bytes
    policy_version: int
    last_sampled_step: int
    samples_served: int
    counters: dict[str, int]
    steps: list[StepContents]  # ascending step


def _prefix(run_id: str) -> str:
    return f"shuffle_r1:buffer:{{{run_id}}}:"


def _chunks(records: Sequence[GroupRecord], groups: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` ranges of ``records`` in order, each of at most ``groups`` records
    and, unless it is a single record, at most ``size`` bytes of payload and summary."""
    out: list[tuple[int, int]] = []
    start, held = 0, 0
    for i, r in enumerate(records):
        n = len(r.payload) + len(r.summary)
        if i > start and (i - start >= groups or held + n > size):
            out.append((start, i))
            start, held = i, 0
        held += n
    if records:
        out.append((start, len(records)))
    return out


class PayloadCache:
    """StoredGroup payloads this process wrote or read lately, by (run, step): the bytes of
    a step's batch need not come back from Redis for the sample that follows the put.

    Never stale: an entry holds the bytes this process wrote to, or read from, Redis for
    (run, step, prompt_id), with the group's digest and the run's spec. A key's content
    cannot change while it exists (a put with other content is refused), and an entry is
    used only when Redis lists its prompt_id with the same digest and the run has the same
    spec. Bounded like Redis (the newest ``keep_steps`` steps per run) and by ``max_bytes``
    in all (least recently used steps go first).
    """

    def __init__(self, keep_steps: int, max_bytes: int) -> None:
        self.keep_steps = keep_steps
        self.max_bytes = max_bytes
        self._steps: OrderedDict[tuple[str, int], tuple[bytes, dict[str, tuple[bytes, bytes]]]]
        self._steps = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def add(
        self, run_id: str, spec: bytes, step: int, entries: Iterable[tuple[str, bytes, bytes]]
    ) -> None:
        """Remember ``(prompt_id, digest, payload)`` entries of one step."""
        with self._lock:
            key = (run_id, step)
            held = self._steps.get(key)
            if held is None or held[0] != spec:
                self._discard(key)
                held = self._steps[key] = (spec, {})
            self._steps.move_to_end(key)
            for prompt_id, digest, payload in entries:
                old = held[1].get(prompt_id)
                self._bytes += len(payload) - (len(old[1]) if old else 0)
                held[1][prompt_id] = (digest, payload)
            run_steps = sorted(s for r, s in self._steps if r == run_id)
            for old_step in run_steps[: max(0, len(run_steps) - self.keep_steps)]:
                self._discard((run_id, old_step))
            while self._bytes > self.max_bytes and self._steps:
                self._discard(next(iter(self._steps)))

    def get(
        self, run_id: str, spec: bytes, step: int, members: Sequence[tuple[str, bytes]]
    ) -> dict[str, bytes]:
        """The cached payloads of ``members`` (Redis's (prompt_id, digest) of the step);
        entries of prompt ids no longer in the step are forgotten."""
        with self._lock:
            held = self._steps.get((run_id, step))
            if held is None or held[0] != spec:
                return {}
            self._steps.move_to_end((run_id, step))
            wanted = dict(members)
            for prompt_id in [p for p in held[1] if p not in wanted]:
                self._bytes -= len(held[1].pop(prompt_id)[1])
            return {p: payload for p, (d, payload) in held[1].items() if wanted[p] == d}

    def forget(self, run_id: str, steps: Iterable[int] | None = None) -> None:
        """Forget ``steps`` of the run (all of them if None)."""
        with self._lock:
            for key in [k for k in self._steps if k[0] == run_id]:
                if steps is None or key[1] in steps:
                    self._discard(key)

    def _discard(self, key: tuple[str, int]) -> None:
        held = self._steps.pop(key, None)
        if held is not None:
            self._bytes -= sum(len(payload) for _, payload in held[1].values())


class BufferStore:
    """The replay buffer's state in Redis (redis-py). Thread-safe: one connection pool.

    Args:
        url: ``redis://[:password@]host:port/db`` (``rediss://`` for TLS); a URL without a
            password uses ``$SHUFFLE_R1_REDIS_PASSWORD`` if set.
        tls: certificates of a ``rediss://`` connection.
        keep_steps: steps held per run; a put that makes a run hold more evicts the oldest.
        max_staleness: weight versions; a group older than the run's newest version minus
            this is refused at put and dropped at sample.
        timeout_s: socket timeout of each Redis command.
        probe_timeout_s: timeout of :meth:`probe` (one attempt, no retry).
        cache_mb: bound of the in-process :class:`PayloadCache`.
        chunk_groups, chunk_bytes: records and bytes per script call of :meth:`put`.

    Raises:
        ValueError: ``tls`` certificates for a URL that is not ``rediss://``.
    """

    def __init__(
        self,
        url: str,
        *,
        keep_steps: int,
        max_staleness: int,
        tls: RedisTLS | None = None,
        timeout_s: float = 10.0,
        probe_timeout_s: float = 2.0,
        cache_mb: int = 1024,
        chunk_groups: int = PUT_CHUNK_GROUPS,
        chunk_bytes: int = PUT_CHUNK_BYTES,
    ) -> None:
        self.url = url
        self.keep_steps = keep_steps
        self.max_staleness = max_staleness
        self.chunk_groups = chunk_groups
        self.chunk_bytes = chunk_bytes
        self._redis = redis_client(
            url,
            tls,
            socket_timeout=timeout_s,
            socket_connect_timeout=min(timeout_s, 2.0),
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=2),
            # A step's groups are megabytes: reading them in 64 KiB chunks (the default)
            # costs more than the transfer; small replies are not slower with this.
            socket_read_size=4 * 2**20,
        )
        self._probe = redis_client(
            url,
            tls,
            socket_timeout=probe_timeout_s,
            socket_connect_timeout=probe_timeout_s,
            retry=Retry(ExponentialBackoff(), retries=0),
        )
        self._cache = PayloadCache(keep_steps, cache_mb * 2**20)
        self._check = self._redis.register_script(_SCRIPTS["check"])
        self._put = self._redis.register_script(_SCRIPTS["put"])
        self._sample = self._redis.register_script(_SCRIPTS["sample"])
        self._drop = self._redis.register_script(_SCRIPTS["drop"])

    def ping(self) -> None:
        """PING with the timeouts and retries of every call; raises ``redis.RedisError`` if
        Redis does not answer (``redis.AuthenticationError`` if it refuses the password)."""
        self._redis.ping()

    def probe(self, expire_s: float) -> None:
        """One write within ``probe_timeout_s``, no retry (the health check): SET of
        :data:`HEALTH_KEY` expiring after ``expire_s``. Raises ``redis.RedisError`` if Redis
        does not answer in time or refuses the write (e.g. ``OutOfMemoryError`` at
        ``maxmemory`` under the noeviction policy, ``ReadOnlyError`` on a replica)."""
        self._probe.set(HEALTH_KEY, b"1", px=max(1, round(expire_s * 1000)))

    def close(self) -> None:
        """Close the connections (the server calls this when it stops)."""
        self._redis.close()
        self._probe.close()

    def get_spec(self, run_id: str) -> bytes | None:
        """The run's stored RunSpec bytes, or None for a run that holds nothing."""
        return self._redis.hget(_prefix(run_id) + "run", "spec")  # type: ignore[return-value]

    def put(self, run_id: str, spec: bytes, records: Sequence[GroupRecord]) -> PutOutcome:
        """Write ``records``; store ``spec`` if the run is new.

        Per record, in order: a key that holds the same digest is a DUPLICATE (untouched);
        a step below the evicted ones, or older than every held step while ``keep_steps``
        are held, is EVICTED; an oldest weight version below the run's newest version
        (this request's included) minus ``max_staleness`` is STALE; otherwise STORED, and
        steps beyond ``keep_steps`` are evicted. Dropped groups are counted in the run.

        A put of more than ``chunk_groups`` records or ``chunk_bytes`` bytes is written in
        chunks, one atomic script each (in order), after a read-only pass over all of them
        that refuses a conflict or another spec before anything is written. Between two
        chunks other clients run: a concurrent Sample may see part of the put. Only if
        Redis fails, or another client writes a conflicting group or drops and re-creates
        the run, between two chunks can this put raise after writing some chunks; a retry
        of the same records then converges (the groups written are DUPLICATE). A put that
        returns wrote all.

        Raises:
            SpecChangedError: the run holds another spec; nothing was written (but for the
                race above).
            ConflictError: a key holds different content; nothing was written (idem).
        """
        prefix = _prefix(run_id)
        chunks = _chunks(records, self.chunk_groups, self.chunk_bytes)
        if len(chunks) > 1:
            for start in range(0, len(records), CHECK_CHUNK_GROUPS):
                part = records[start : start + CHECK_CHUNK_GROUPS]
                argv: list[bytes | str | int] = [prefix, spec, len(part)]
                for r in part:
                    argv += [str(r.step), r.prompt_id, r.digest]
                self._raise_refusal(run_id, self._check(args=argv), records, start)
        newest = max(r.oldest_weight_version for r in records)
        statuses: list[int] = []
        evicted: list[int] = []
        evicted_groups = 0
        held = Held(0, 0)
        for start, stop in chunks:
            part = records[start:stop]
            argv = [prefix, spec, self.keep_steps, self.max_staleness, len(part), newest]
            for r in part:
                argv += [
                    str(r.step), r.prompt_id, r.digest, r.oldest_weight_version,
                    r.pairs_kept, r.pairs_dropped, r.payload, r.summary, r.rollouts_kept,
                ]  # fmt: skip
            reply = self._put(args=argv)
            self._raise_refusal(run_id, reply, records, start)
            part_statuses = [int(x) for x in reply[1]]
            part_evicted = [int(x) for x in reply[3]]
            if part_evicted:
                self._cache.forget(run_id, part_evicted)
            written: dict[int, list[tuple[str, bytes, bytes]]] = {}
            for r, status in zip(part, part_statuses, strict=True):
                if status == STORED:  # exactly the bytes written
                    written.setdefault(r.step, []).append((r.prompt_id, r.digest, r.payload))
            for step, entries in written.items():
                if step not in part_evicted:
                    self._cache.add(run_id, spec, step, entries)
            statuses += part_statuses
            evicted += part_evicted
            evicted_groups += int(reply[2])
            held = Held(int(reply[4]), int(reply[5]))
        return PutOutcome(statuses, evicted, evicted_groups, held)

    @staticmethod
    def _raise_refusal(
        run_id: str, reply: list, records: Sequence[GroupRecord], offset: int
    ) -> None:
        """Raise for a ``spec`` or ``conflict`` reply of check.lua or put.lua (a chunk of
        ``records`` from ``offset``)."""
        if reply[0] == b"spec":
            raise SpecChangedError(reply[1])
        if reply[0] == b"conflict":
            r = records[offset + int(reply[1])]
            raise ConflictError(
                f"run {run_id!r} already holds a different group at step {r.step}, "
                f"prompt_id {echo(r.prompt_id)}; a put is idempotent only with identical "
                "content: send the original group or use a new prompt_id"
            )

    def sample(
        self,
        run_id: str,
        step: int,
        policy_version: int,
        expected_groups: int,
        spec: bytes = b"",
    ) -> StepSnapshot:
        """Read the groups of ``step`` for a draw, atomically with the cursor update.

        Groups whose oldest weight version is below ``policy_version - max_staleness`` are
        deleted first and counted (their digest stays: they still count as accepted). The
        run's cursor records ``step`` as the last sampled and counts the call. A call that
        raises changed nothing.

        Raises:
            SpecChangedError: ``spec`` (RunSpec bytes; empty = any) is not the run's.
            NotFoundError: the run holds nothing, or the step never held a group (with
                ``expected_groups == 0``).
            PreconditionError: the step was evicted, or fewer than ``expected_groups``
                groups of it were accepted, none if the run holds nothing (data loss, e.g.
                a Redis restart without persistence). The message names the run, the step
                and both counts.
        """
        prefix = _prefix(run_id)
        reply = self._sample(
            args=[prefix, str(step), policy_version, self.max_staleness, expected_groups, spec]
        )
        kind = reply[0]
        if kind == b"spec":
            raise SpecChangedError(reply[1])
        if kind == b"norun":
            raise NotFoundError(f"run {run_id!r} holds no data: put groups first")
        if kind == b"nostep":
            raise NotFoundError(f"run {run_id!r} holds no groups for step {step}")
        if kind == b"evicted":
            raise PreconditionError(
                f"step {step} of run {run_id!r} was evicted: the run holds steps >= "
                f"{int(reply[1])} (buffer keep_steps={self.keep_steps})"
            )
        if kind == b"toofew":
            raise PreconditionError(
                f"run {run_id!r} holds {int(reply[1])} groups of step {step} but the "
                f"trainer expects {expected_groups} (expected_groups): fewer groups than "
                "expected, groups were lost (was Redis restarted without persistence?); "
                "re-generate the step's groups"
            )
        stored_spec = reply[1]
        members = [(p.decode(), d) for p, d in zip(reply[3], reply[4], strict=True)]
        payloads = self._cache.get(run_id, stored_spec, step, members)
        missing = [(p, d) for p, d in members if p not in payloads]
        if missing:
            key = f"{prefix}step:{step}:groups"
            fetched: list[bytes | None] = self._redis.hmget(key, [p for p, _ in missing])  # type: ignore[assignment]
            if any(v is None for v in fetched):
                raise ChangedError(
                    f"groups of step {step} of run {run_id!r} were deleted during this "
                    "Sample (evicted or dropped by another call); retry"
                )
            entries = [(p, d, v) for (p, d), v in zip(missing, fetched, strict=True) if v]
            self._cache.add(run_id, stored_spec, step, entries)
            payloads.update((p, v) for p, _, v in entries)
        return StepSnapshot(
            spec=stored_spec,
            stale_dropped=int(reply[2]),
            payloads=[payloads[p] for p in sorted(payloads)],
            held=Held(int(reply[5]), int(reply[6])),
        )

    def contents(self, run_id: str) -> RunContents:
        """Everything Stats reports, read in two transactions (MULTI/EXEC).

        Raises:
            NotFoundError: the run holds nothing.
        """
        prefix = _prefix(run_id)
        pipe = self._redis.pipeline(transaction=True)
        pipe.hgetall(prefix + "run")
        pipe.zrange(prefix + "steps", 0, -1)
        pipe.hgetall(prefix + "cursor")
        run, steps, cursor = pipe.execute()
        if b"spec" not in run:
            raise NotFoundError(f"run {run_id!r} holds no data: put groups first")
        pipe = self._redis.pipeline(transaction=True)
        for s in steps:
            sk = prefix + f"step:{s.decode()}:"
            pipe.hlen(sk + "groups")
            pipe.hlen(sk + "digest")
            pipe.memory_usage(sk + "groups", samples=0)
            pipe.hgetall(sk + "summary")
        replies = pipe.execute()
        contents = []
        for i, s in enumerate(steps):
            stored, accepted, size, summary = replies[4 * i : 4 * i + 4]
            contents.append(
                StepContents(
                    step=int(s),
                    groups_stored=int(stored),
                    groups_accepted=int(accepted),
                    memory_bytes=int(size or 0),
                    summaries=[summary[k] for k in sorted(summary)],
                )
            )
        return RunContents(
            spec=run[b"spec"],
            policy_version=int(run.get(b"policy_version", -1)),
            last_sampled_step=int(cursor.get(b"last_sampled_step", -1)),
            samples_served=int(cursor.get(b"samples_served", 0)),
            counters={c: int(run.get(c.encode(), 0)) for c in COUNTERS},
            steps=contents,
        )

    def drop(self, run_id: str) -> tuple[bool, int]:
        """Delete every key of the run atomically; (whether it existed, groups deleted)."""
        existed, groups = self._drop(args=[_prefix(run_id)])
        self._cache.forget(run_id)
        return bool(existed), int(groups)
