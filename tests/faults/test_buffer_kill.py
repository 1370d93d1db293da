"""The buffer service killed with SIGKILL (issue #8): a new process on the same Redis
resumes from it, with nothing lost, and serves the very batch a never-killed server serves;
a client with a retry budget rides over the restart."""

from __future__ import annotations

import grpc
import pytest
from buffer_helpers import (
    kill9,
    metric_samples,
    random_groups,
    scrape,
    spawn_service,
    start_service,
)

from protos import replay_buffer_pb2 as pb
from services.embedded_redis import EmbeddedRedis
from services.replay_buffer.client import TOKEN_ENV, ReplayBufferClient
from shuffle_r1.net import free_port

TOKEN = "test-token-\N{GREEK SMALL LETTER ALPHA}".encode().hex()
SAMPLE = "/shuffle_r1.buffer.v1.ReplayBuffer/Sample"


def raw_sample(address: str, request: pb.SampleRequest, token: str = "") -> bytes:
    """Sample's response exactly as the server sent it (no parsing)."""
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    with grpc.insecure_channel(address) as channel:
        return channel.unary_unary(SAMPLE)(request.SerializeToString(), timeout=10,
                                           metadata=metadata)  # fmt: skip


def test_kill_9_and_restart_lose_nothing(redis_url, run_id):
    metrics_port = free_port()
    process, address = start_service(redis_url, "--keep-steps", "5",
                                     "--metrics-port", str(metrics_port),
                                     env={TOKEN_ENV: TOKEN})  # fmt: skip
    try:
        client = ReplayBufferClient(address, token=TOKEN, timeout_s=10, retries=0)
        steps = {s: random_groups(run_id, s, 5, n=8, seed=s) for s in range(3)}
        for groups in steps.values():
            client.put_groups(groups)
        first = {s: client.sample(run_id, s, policy_version=0, expected_groups=5) for s in (0, 1)}
        stats = client.stats(run_id)
        stored = ("shuffle_r1_buffer_groups_put_total", frozenset({("outcome", "stored")}))
        assert metric_samples(scrape(metrics_port))[stored] == 15
        client.close()
    finally:
        kill9(process)

    process, address = start_service(redis_url, env={TOKEN_ENV: TOKEN})
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


def test_killed_between_put_and_sample_serves_the_never_killed_batch(
    redis_url, run_id, start_buffer
):
    groups = random_groups(run_id, 0, 6, n=8, seed=11)
    request = pb.SampleRequest(run_id=run_id, step=0, policy_version=0, expected_groups=6)
    # the reference: a server that is never killed, given the same groups on its own Redis
    with EmbeddedRedis() as other:
        reference = start_buffer(redis_url=other.url)
        assert reference.client.put_groups(groups).stored == 6
        expected = raw_sample(reference.address, request)

    port = free_port()  # fixed, so the client finds the restarted service where it looks
    process, address = start_service(redis_url, "--port", str(port))
    assert address.endswith(f":{port}")
    with ReplayBufferClient(address, token="", timeout_s=10, retries=0) as client:
        assert client.put_groups(groups).stored == 6
    kill9(process)  # after the put, before any sample
    restarted = spawn_service(redis_url, "--port", str(port))  # it takes a few seconds
    try:
        with ReplayBufferClient(address, token="", timeout_s=5, retries=0) as client:
            with pytest.raises(grpc.RpcError) as info:  # nobody listens yet
                client.sample(run_id, 0, policy_version=0, expected_groups=6)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # gRPC retries UNAVAILABLE (attempts at about 0, 2, 6, 14 and 30 s) and does not
        # report its retries: test_grpc_retries.py counts them on a scripted server
        with ReplayBufferClient(address, token="", retries=4, backoff_s=2) as client:
            batch = client.sample(run_id, 0, policy_version=0, expected_groups=6)
            assert batch == pb.SampleResponse.FromString(expected)
            assert raw_sample(address, request) == expected  # byte for byte
            assert client.stats(run_id).counters.groups_stored == 6  # stored once
    finally:
        kill9(restarted)
