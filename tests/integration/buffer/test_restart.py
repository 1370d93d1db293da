"""Crash and restart: the service killed with SIGKILL and started again on the same Redis
loses nothing; Redis failures are answered UNAVAILABLE and the service stays up."""

import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from buffer_helpers import random_groups
from grpc_health.v1 import health_pb2

from services.embedded_redis import EmbeddedRedis, free_port
from services.replay_buffer.cli import TOKEN_ENV
from services.replay_buffer.client import ReplayBufferClient

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "test-token-\N{GREEK SMALL LETTER ALPHA}".encode().hex()


def start_service(redis_url: str, *extra: str) -> tuple[subprocess.Popen, str]:
    """``python -m services.replay_buffer.cli serve`` as a child; waits for its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "services.replay_buffer.cli", "serve", "--redis-url", redis_url,
         "--port", "0", *extra],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, TOKEN_ENV: TOKEN},
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            if line.startswith("replay buffer listening on "):
                return process, line.split()[-1]
        if process.poll() is not None:
            raise RuntimeError(f"the service exited: {process.stderr.read()}")
    process.kill()
    raise RuntimeError("the service did not report its port in 60 s")


def kill9(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL


def test_kill_9_and_restart_lose_nothing(redis_url, run_id):
    metrics_port = free_port()
    process, address = start_service(redis_url, "--keep-steps", "5",
                                     "--metrics-port", str(metrics_port))  # fmt: skip
    try:
        client = ReplayBufferClient(address, token=TOKEN, timeout_s=10, retries=0)
        steps = {s: random_groups(run_id, s, 5, n=8, seed=s) for s in range(3)}
        for groups in steps.values():
            client.put_groups(groups)
        first = {s: client.sample(run_id, s, policy_version=0, expected_groups=5) for s in (0, 1)}
        stats = client.stats(run_id)
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
        assert b'shuffle_r1_buffer_groups_put_total{outcome="stored"} 15.0' in scraped
        client.close()
    finally:
        kill9(process)

    process, address = start_service(redis_url)
    try:
        client = ReplayBufferClient(address, token=TOKEN, timeout_s=10, retries=0)
        after = client.stats(run_id)
        assert after.steps == stats.steps  # every stored group is still there
        assert after.counters == stats.counters
        assert (after.cursor.last_sampled_step, after.cursor.samples_served) == (1, 2)
        for s in (0, 1):  # re-sampling a step after the crash gives the identical batch
            assert client.sample(run_id, s, policy_version=0, expected_groups=5) == first[s]
        batch = client.sample(run_id, 2, policy_version=0, expected_groups=5)
        assert {i.prompt_id for i in batch.items} <= {g.prompt_id for g in steps[2]}
        assert client.stats(run_id).cursor.samples_served == 5
        client.close()
    finally:
        kill9(process)


def test_bad_settings_exit_with_the_key(redis_url):
    result = subprocess.run(
        [sys.executable, "-m", "services.replay_buffer.cli", "serve", "--keep-steps", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "buffer.keep_steps=0 must be >= 1" in result.stderr


def test_redis_outage_is_unavailable_then_recovers(start_buffer, run_id, tmp_path):
    with EmbeddedRedis(data_dir=tmp_path, appendonly=True) as private:
        buffer = start_buffer(redis_url=private.url)
        groups = random_groups(run_id, 0, 4)
        buffer.client.put_groups(groups)
        before = buffer.client.sample(run_id, 0, policy_version=0, expected_groups=4)

        private.stop(kill=True)
        with pytest.raises(grpc.RpcError) as info:
            buffer.client.put_groups(random_groups(run_id, 1, 2))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Redis at redis://127.0.0.1" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            buffer.client.sample(run_id, 0, policy_version=0)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert buffer.metric("shuffle_r1_buffer_redis_errors_total", op="PutGroups") == 1
        assert buffer.metric("shuffle_r1_buffer_redis_errors_total", op="Sample") == 1
        assert buffer.client.health() == health_pb2.HealthCheckResponse.SERVING

        private.start()  # same port, same append-only file
        after = buffer.client.sample(run_id, 0, policy_version=0, expected_groups=4)
        assert after.items == before.items
        assert buffer.client.put_groups(groups).duplicates == 4
