"""A big put is written in chunks (issue #20): other clients of Redis keep being served
while it runs, a conflict anywhere in it still writes nothing, and the result is the one a
single call gives (statuses, counters, evictions, batches)."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import replace

import pytest
from buffer_helpers import random_groups, run_contents

from protos import replay_buffer_pb2 as pb
from services.embedded_redis import EmbeddedRedis, redis_client
from services.replay_buffer import logic
from services.replay_buffer.store import (
    DUPLICATE,
    STORED,
    BufferStore,
    ConflictError,
    GroupRecord,
)
from shuffle_r1.config import AlgorithmConfig

SPEC = pb.RunSpec(algorithm="shuffle_r1", keep_ratio=0.5, shuffle_times=2, seed=3)


def small_records(count: int, step: int = 0) -> list[GroupRecord]:
    """``count`` groups of small made-up values: Redis's work per group is the same as
    for real ones, without the cost of computing them."""
    return [
        GroupRecord(step=step, prompt_id=f"p{i:06d}", digest=hashlib.sha256(b"%d" % i).digest(),
                    oldest_weight_version=0, pairs_kept=1, pairs_dropped=0,
                    payload=b"payload-%d" % i, summary=b"summary", rollouts_kept=2)
        for i in range(count)
    ]  # fmt: skip


@pytest.fixture
def private_redis():
    """A Redis of this test alone: a put that blocks it holds up no other test."""
    with EmbeddedRedis(appendonly=False) as private:
        yield private.url


def test_a_big_put_does_not_block_other_clients(private_redis):
    """40,000 groups: in one script call they held Redis ~1-3 s; in chunks every PING of
    another client is answered within a generous 0.5 s."""
    store = BufferStore(private_redis, keep_steps=2, max_staleness=0, timeout_s=60)
    records = small_records(40_000)
    latencies: list[float] = []
    done = threading.Event()

    def ping() -> None:
        client = redis_client(private_redis)
        while not done.is_set():
            start = time.perf_counter()
            client.ping()
            latencies.append(time.perf_counter() - start)
            time.sleep(0.002)
        client.close()

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        outcome = store.put("big", SPEC.SerializeToString(), records)
    finally:
        done.set()
        pinger.join()
        store.close()
    assert outcome.statuses == [STORED] * len(records) and outcome.held.groups == len(records)
    assert len(latencies) > 10  # the pings ran during the put
    assert max(latencies) < 0.5, f"a PING waited {max(latencies):.2f} s during the put"


def test_a_conflict_in_a_later_chunk_writes_nothing(private_redis):
    store = BufferStore(private_redis, keep_steps=2, max_staleness=0, chunk_groups=2)
    records = small_records(7)
    store.put("run", SPEC.SerializeToString(), records[6:])  # the last group, as it was
    raw = redis_client(private_redis)
    before = run_contents(raw, "run")
    changed = [*records[:6], replace(records[6], digest=b"other")]
    with pytest.raises(ConflictError) as info:
        store.put("run", SPEC.SerializeToString(), changed)
    assert "prompt_id 'p000006'" in str(info.value)
    assert run_contents(raw, "run") == before  # chunks 1-3 were not written either
    assert store.put("run", SPEC.SerializeToString(), records).statuses == [STORED] * 6 + [
        DUPLICATE
    ]
    raw.close()
    store.close()


def test_chunks_give_what_one_call_gives(private_redis):
    """Groups of three steps with keep_steps=2 (so the put evicts a step between chunks)
    and a duplicate: the same statuses, counters, held sizes and batches in chunks of 2
    groups (and of ~1 group by bytes) as in one call."""
    groups = [g for s in (0, 1, 2) for g in random_groups("x", s, 5, seed=s)]
    groups.insert(3, groups[1])  # a retried group within the request
    records = logic.prepare_groups(groups, logic.resolve_spec(SPEC, AlgorithmConfig(), "x"))
    spec = SPEC.SerializeToString()
    results = {}
    for name, options in (("one call", {"chunk_groups": 10**6, "chunk_bytes": 2**40}),
                          ("by groups", {"chunk_groups": 2}),
                          ("by bytes", {"chunk_bytes": 1})):  # fmt: skip
        run = name.replace(" ", "-")
        store = BufferStore(private_redis, keep_steps=2, max_staleness=0, **options)
        outcome = store.put(run, spec, records)
        raw = redis_client(private_redis)
        contents = {key.split(b"}")[1]: value for key, value in run_contents(raw, run).items()}
        raw.close()
        batches = [store.sample(run, s, 0, 5).payloads for s in (1, 2)]
        results[name] = (outcome, contents, batches)
        store.close()
    outcome = results["one call"][0]
    assert outcome.evicted_steps == [0] and outcome.statuses.count(DUPLICATE) == 1
    assert results["by groups"] == results["one call"]
    assert results["by bytes"] == results["one call"]
