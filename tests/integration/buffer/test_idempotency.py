"""A put is atomic and idempotent per (run, step, prompt_id): a retry after a timeout
neither loses nor duplicates a group; different content under a stored key is refused and
the request writes nothing."""

import threading
import time

import grpc
import pytest
import redis
from buffer_helpers import make_group, random_groups, run_keys

from protos import replay_buffer_pb2 as pb
from services.embedded_redis import EmbeddedRedis
from services.replay_buffer.client import ReplayBufferClient


def test_retry_reports_duplicates_and_changes_nothing(buffer, run_id, redis_client):
    groups = random_groups(run_id, step=0, count=4)
    buffer.client.put_groups(groups)
    before = buffer.client.sample(run_id, 0, policy_version=0)
    snapshot = {k: redis_client.dump(k) for k in run_keys(redis_client, run_id)
                if not k.endswith((b":run", b":cursor"))}  # fmt: skip

    retry = buffer.client.put_groups(groups)
    assert list(retry.statuses) == [pb.PUT_STATUS_DUPLICATE] * 4
    assert (retry.stored, retry.duplicates, retry.pairs_kept) == (0, 4, 0)
    assert {k: redis_client.dump(k) for k in snapshot} == snapshot
    assert buffer.client.sample(run_id, 0, policy_version=0).items == before.items
    counters = buffer.client.stats(run_id).counters
    assert (counters.groups_stored, counters.duplicates) == (4, 4)


def test_partial_retry_stores_only_the_new_groups(buffer, run_id):
    groups = random_groups(run_id, step=0, count=6)
    buffer.client.put_groups(groups[:4])
    retry = buffer.client.put_groups(groups)
    assert list(retry.statuses) == [pb.PUT_STATUS_DUPLICATE] * 4 + [pb.PUT_STATUS_STORED] * 2
    assert buffer.client.stats(run_id).steps[0].groups_stored == 6


def test_different_content_is_refused_and_the_request_writes_nothing(buffer, run_id):
    stored = make_group(run_id, 0, "a", [1, 0, 0, 1])
    buffer.client.put_groups([stored])
    changed = make_group(run_id, 0, "a", [1, 0, 0, 0])
    fresh = make_group(run_id, 0, "b", [1, 0, 1, 0])
    with pytest.raises(grpc.RpcError) as info:
        buffer.client.put_groups([fresh, changed])
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "prompt_id 'a'" in info.value.details() and "step 0" in info.value.details()
    stats = buffer.client.stats(run_id)
    assert stats.steps[0].groups_stored == 1  # "b" was not written either
    batch = buffer.client.sample(run_id, 0, policy_version=0)
    assert {i.rollout.reward for i in batch.items} == {1.0, 0.0}  # the original "a"


def test_spec_is_fixed_at_the_first_put(buffer, run_id):
    spec = pb.RunSpec(algorithm="shuffle_r1", keep_ratio=0.5, shuffle_times=4, seed=7)
    buffer.client.put_groups(random_groups(run_id, 0, 2), spec=spec)
    # no spec: the run's; the same spec: fine
    assert buffer.client.put_groups(random_groups(run_id, 1, 2)).spec == spec
    buffer.client.put_groups(random_groups(run_id, 2, 2), spec=spec)
    with pytest.raises(grpc.RpcError) as info:
        buffer.client.put_groups(random_groups(run_id, 3, 2), spec=pb.RunSpec(shuffle_times=2))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "shuffle_times: 4" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        buffer.client.sample(run_id, 0, policy_version=0, spec=pb.RunSpec(algorithm="grpo"))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_retry_after_a_timeout_neither_loses_nor_duplicates(start_buffer, run_id, tmp_path):
    """Redis stalls (CLIENT PAUSE) longer than the client's deadline: the first attempt
    times out on the client but completes on the server; the retries see duplicates."""
    with EmbeddedRedis(data_dir=tmp_path) as private:
        buffer = start_buffer(redis_url=private.url)
        client = ReplayBufferClient(buffer.address, timeout_s=0.3, retries=4, backoff_s=0.1)
        admin = redis.Redis.from_url(private.url)
        groups = random_groups(run_id, step=0, count=8)
        admin.execute_command("CLIENT", "PAUSE", 1000, "WRITE")
        started = time.monotonic()
        response = client.put_groups(groups)
        assert time.monotonic() - started > 0.9  # it waited out the pause by retrying
        assert set(response.statuses) <= {pb.PUT_STATUS_STORED, pb.PUT_STATUS_DUPLICATE}
        stats = client.stats(run_id)
        assert stats.steps[0].groups_stored == 8
        assert stats.counters.groups_stored == 8  # written exactly once
        assert stats.counters.duplicates >= 8  # by a retry, after the timed-out attempt
        batch = client.sample(run_id, 0, policy_version=0, expected_groups=8)
        assert {i.prompt_id for i in batch.items} <= {g.prompt_id for g in groups}
        client.close()
        admin.close()


def test_concurrent_identical_puts_store_once(buffer, run_id):
    groups = random_groups(run_id, step=0, count=16)
    results = []

    def put():
        results.append(buffer.client.put_groups(groups))

    threads = [threading.Thread(target=put) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sum(r.stored for r in results) == 16
    assert sum(r.duplicates for r in results) == 16 * 5
    assert buffer.client.stats(run_id).counters.groups_stored == 16
