"""Redis dies under a running buffer (issue #8). With AOF persistence (fsync always) a
kill -9 and restart loses no acknowledged write; without persistence the data is gone and
Sample says so (FAILED_PRECONDITION naming run, step and counts) instead of serving a
partial batch. While Redis is down, or refuses writes (``maxmemory``), every put is
UNAVAILABLE and the gRPC health status is NOT_SERVING; it is SERVING again once Redis
accepts writes."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import redis
from buffer_helpers import random_groups, run_contents
from grpc_health.v1 import health_pb2

from services.embedded_redis import EmbeddedRedis, redis_client

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def wait_for_health(buffer, status, timeout_s: float = 10.0) -> float:
    """Poll the server's health until it is ``status``; returns the seconds it took."""
    start = time.monotonic()
    while buffer.client.health() != status:
        assert time.monotonic() - start < timeout_s, f"health did not become {status}"
        time.sleep(0.05)
    return time.monotonic() - start


def test_redis_killed_with_aof_loses_nothing(start_buffer, run_id, tmp_path):
    with EmbeddedRedis(data_dir=tmp_path, appendonly=True) as private:
        buffer = start_buffer(redis_url=private.url, health_check_s=0.1)
        raw = redis_client(private.url)
        groups = {s: random_groups(run_id, s, 4, seed=s) for s in (0, 1)}
        for step_groups in groups.values():
            assert buffer.client.put_groups(step_groups).stored == 4
        before = buffer.client.sample(run_id, 0, policy_version=0, expected_groups=4)
        stored = run_contents(raw, run_id)
        assert len(stored) >= 10  # run, steps, cursor and the hashes of two steps

        private.stop(kill=True)
        assert wait_for_health(buffer, NOT_SERVING) < 5
        calls = {
            "PutGroups": lambda: buffer.client.put_groups(random_groups(run_id, 2, 2)),
            "Sample": lambda: buffer.client.sample(run_id, 1, policy_version=0),
            "Stats": lambda: buffer.client.stats(run_id),
            "DropRun": lambda: buffer.client.drop_run(run_id),
        }
        for method, call in calls.items():
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, method
            assert f"Redis at {private.url} failed during {method}" in info.value.details()
            assert buffer.metric("shuffle_r1_buffer_redis_errors_total", op=method) == 1
        assert buffer.metric("shuffle_r1_buffer_redis_errors_total", op="health") >= 1
        assert buffer.client.health(service="shuffle_r1.buffer.v1.ReplayBuffer") == NOT_SERVING

        private.start()  # same port, same append-only file
        assert wait_for_health(buffer, SERVING) < 5
        assert run_contents(raw, run_id) == stored  # every acknowledged write, every byte
        assert buffer.client.sample(run_id, 0, policy_version=0, expected_groups=4) == before
        step1 = buffer.client.sample(run_id, 1, policy_version=0, expected_groups=4)
        assert step1.groups == 4 and len(step1.items) > 0
        assert buffer.client.put_groups(groups[0]).duplicates == 4
        raw.close()


def test_redis_restarted_without_persistence_is_detected(start_buffer, run_id):
    with EmbeddedRedis(appendonly=False) as private:
        buffer = start_buffer(redis_url=private.url, health_check_s=0.1)
        groups = random_groups(run_id, 3, 4)
        assert buffer.client.put_groups(groups).stored == 4
        private.stop(kill=True)
        wait_for_health(buffer, NOT_SERVING)
        private.start()  # an empty Redis on the same port
        wait_for_health(buffer, SERVING)

        with pytest.raises(grpc.RpcError) as info:
            buffer.client.sample(run_id, 3, policy_version=0, expected_groups=4)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = info.value.details()
        assert f"run {run_id!r} holds 0 groups of step 3 but the trainer expects 4" in details
        assert "expected_groups" in details and "re-generate" in details
        with pytest.raises(grpc.RpcError) as info:  # without the check: nothing to serve
            buffer.client.sample(run_id, 3, policy_version=0)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        # a partial re-put is refused too; regenerating the whole step then serves it
        assert buffer.client.put_groups(groups[:2]).stored == 2
        with pytest.raises(grpc.RpcError) as info:
            buffer.client.sample(run_id, 3, policy_version=0, expected_groups=4)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "holds 2 groups of step 3 but the trainer expects 4" in info.value.details()
        assert buffer.metric("shuffle_r1_buffer_samples_total") == 0  # no partial batch served
        put = buffer.client.put_groups(groups)
        assert (put.stored, put.duplicates) == (2, 2)
        batch = buffer.client.sample(run_id, 3, policy_version=0, expected_groups=4)
        assert batch.groups == 4
        assert {i.prompt_id for i in batch.items} <= {g.prompt_id for g in groups}


def test_health_is_not_serving_while_redis_refuses_writes(start_buffer, run_id):
    """Redis at ``maxmemory`` under noeviction answers PING but refuses every write: puts
    fail UNAVAILABLE, so health says NOT_SERVING; SERVING again once writes succeed."""
    with EmbeddedRedis(appendonly=False) as private:
        buffer = start_buffer(redis_url=private.url, health_check_s=0.1)
        admin = redis_client(private.url)
        for i in range(20):  # 2 MB of data, then a limit 1 MiB below what Redis holds
            admin.set(f"filler:{i}", b"x" * 100_000)
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", int(admin.info("memory")["used_memory"]) - 2**20)
        with pytest.raises(redis.OutOfMemoryError):
            admin.set("one-more", b"x")
        assert admin.ping()  # Redis answers ...
        with pytest.raises(grpc.RpcError) as info:  # ... but a put cannot be written
            buffer.client.put_groups(random_groups(run_id, 0, 2))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "OutOfMemoryError" in info.value.details()
        assert wait_for_health(buffer, NOT_SERVING, timeout_s=5) < 5
        assert buffer.client.health(service="shuffle_r1.buffer.v1.ReplayBuffer") == NOT_SERVING

        admin.config_set("maxmemory", 0)  # no limit: writes succeed again
        assert wait_for_health(buffer, SERVING, timeout_s=5) < 5
        assert buffer.client.put_groups(random_groups(run_id, 0, 2)).stored == 2
        admin.close()


def test_health_thread_ends_with_the_server(start_buffer):
    before = {t.ident for t in threading.enumerate() if t.name == "buffer-health"}
    buffer = start_buffer(health_check_s=0.1)
    ours = [t for t in threading.enumerate() if t.name == "buffer-health" and t.ident not in before]
    assert len(ours) == 1 and ours[0].is_alive()
    assert buffer.server.stop(0).wait(timeout=10)  # set once everything has ended
    assert not ours[0].is_alive()
