"""The client's retries are gRPC's own (a ``retryPolicy`` on the channel), checked against a
real gRPC server on loopback whose servicer answers as each test scripts it and counts the
attempts that reach it."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from buffer_helpers import make_group
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import replay_buffer_pb2 as pb
from protos import replay_buffer_pb2_grpc as pb_grpc
from services.replay_buffer.client import ReplayBufferClient
from shuffle_r1.net import free_port

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


class Scripted(pb_grpc.ReplayBufferServicer, health_pb2_grpc.HealthServicer):
    """PutGroups and Health.Check that fail with ``codes``, one per attempt in order, then
    answer; an attempt whose code is None stalls for ``stall_s`` first. ``attempts`` holds
    each attempt's ``grpc-previous-rpc-attempts`` header (None on the first)."""

    def __init__(self, codes: list[grpc.StatusCode | None], stall_s: float = 0.0) -> None:
        self.codes = list(codes)
        self.stall_s = stall_s
        self.attempts: list[str | None] = []
        self.lock = threading.Lock()

    def _attempt(self, context: grpc.ServicerContext) -> None:
        with self.lock:
            headers = dict(context.invocation_metadata())
            self.attempts.append(headers.get("grpc-previous-rpc-attempts"))
            code = self.codes.pop(0) if self.codes else grpc.StatusCode.OK
        if code is None:
            time.sleep(self.stall_s)
        elif code != grpc.StatusCode.OK:
            context.abort(code, f"scripted {code.name}")

    def PutGroups(
        self, request: pb.PutGroupsRequest, context: grpc.ServicerContext
    ) -> pb.PutGroupsResponse:
        self._attempt(context)
        return pb.PutGroupsResponse(stored=len(request.groups))

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self._attempt(context)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def serve(servicer: Scripted, port: int) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(8),
                         options=[("grpc.max_receive_message_length", 64 * 2**20)])  # fmt: skip
    pb_grpc.add_ReplayBufferServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, str]]:
    """A scripted servicer (``codes`` set by the test) served on a free loopback port."""
    servicer, port = Scripted([]), free_port()
    server = serve(servicer, port)
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_unavailable_is_retried_until_the_server_answers(scripted):
    servicer, address = scripted
    servicer.codes = [UNAVAILABLE, UNAVAILABLE]
    with ReplayBufferClient(address, token="", retries=2, backoff_s=0.05) as client:
        assert client.put_groups([make_group("r", 0, "a", [1.0, 0.0])]).stored == 1
    assert servicer.attempts == [None, "1", "2"]  # the last of the 3 attempts allowed


def test_a_server_that_never_recovers_gets_every_attempt_and_one_log_line(scripted, caplog):
    servicer, address = scripted
    caplog.set_level(logging.WARNING, logger="services.replay_buffer.client")
    for retries in (4, 1):
        servicer.codes, servicer.attempts = [UNAVAILABLE] * 10, []
        client = ReplayBufferClient(address, token="", retries=retries, backoff_s=0.02)
        with client, pytest.raises(grpc.RpcError) as info:
            client.put_groups([make_group("r", 0, "a", [1.0, 0.0])])
        assert info.value.code() == UNAVAILABLE
        assert len(servicer.attempts) == retries + 1
    messages = [r.getMessage() for r in caplog.records]  # one line per failed call
    assert len(messages) == 2
    assert "UNAVAILABLE after" in messages[0] and "up to 5 attempts" in messages[0]
    assert "up to 2 attempts (scripted UNAVAILABLE)" in messages[1]


def test_invalid_argument_is_not_retried(scripted, caplog):
    servicer, address = scripted
    servicer.codes = [grpc.StatusCode.INVALID_ARGUMENT]
    caplog.set_level(logging.WARNING, logger="services.replay_buffer.client")
    client = ReplayBufferClient(address, token="", retries=4, backoff_s=0.02)
    with client, pytest.raises(grpc.RpcError) as info:
        client.put_groups([make_group("r", 0, "a", [1.0, 0.0])])
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert servicer.attempts == [None]
    assert not caplog.records


def test_a_put_larger_than_grpcs_default_retry_buffer_is_retried(scripted):
    """gRPC keeps 256 KiB of a call's messages for retries by default, and does not retry a
    call that sent more; the client keeps up to ``max_message_mb``."""
    servicer, address = scripted
    servicer.codes = [UNAVAILABLE]
    big = make_group("r", 0, "a", [1.0] * 128, response_tokens=2048)
    assert big.ByteSize() > 512 * 2**10
    client = ReplayBufferClient(address, token="", retries=1, backoff_s=0.02, max_message_mb=8)
    with client:
        assert client.put_groups([big]).stored == 1
    assert servicer.attempts == [None, "1"]


@pytest.mark.serial  # times itself
def test_an_attempt_unanswered_within_timeout_s_is_retried(scripted):
    servicer, address = scripted
    servicer.codes, servicer.stall_s = [None], 1.0  # the first attempt stalls 1 s
    client = ReplayBufferClient(address, token="", timeout_s=0.3, retries=1, backoff_s=0.02)
    with client:
        started = time.monotonic()
        assert client.put_groups([make_group("r", 0, "a", [1.0, 0.0])]).stored == 1
        assert 0.3 <= time.monotonic() - started < 0.9  # not waiting out the stall
    assert servicer.attempts == [None, "1"]


def test_every_attempt_unanswered_ends_with_deadline_exceeded(scripted):
    servicer, address = scripted
    servicer.codes, servicer.stall_s = [None] * 3, 1.0
    client = ReplayBufferClient(address, token="", timeout_s=0.3, retries=2, backoff_s=0.02)
    with client, pytest.raises(grpc.RpcError) as info:
        client.put_groups([make_group("r", 0, "a", [1.0, 0.0])])
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # not CANCELLED
    assert servicer.attempts == [None, "1", "2"]


def test_health_is_retried(scripted):
    servicer, address = scripted
    servicer.codes = [UNAVAILABLE]
    with ReplayBufferClient(address, token="", retries=1, backoff_s=0.02) as client:
        assert client.health() == health_pb2.HealthCheckResponse.SERVING
    assert servicer.attempts == [None, "1"]


def test_a_server_briefly_down_is_reached_by_a_later_attempt():
    """Nobody listens on the port when the call starts; a server starts there 0.5 s later,
    within the retry budget (attempts at about 0, 0.2, 0.6, 1.4 and 3 s)."""
    servicer, port = Scripted([]), free_port()
    servers: list[grpc.Server] = []
    later = threading.Timer(0.5, lambda: servers.append(serve(servicer, port)))
    with ReplayBufferClient(f"127.0.0.1:{port}", token="", retries=4, backoff_s=0.2) as client:
        later.start()
        try:
            assert client.put_groups([make_group("r", 0, "a", [1.0, 0.0])]).stored == 1
        finally:
            later.join()
            servers[0].stop(None)
    assert len(servicer.attempts) == 1  # the earlier attempts found nobody listening


@pytest.mark.parametrize("retries", [-1, 5, 20])
def test_retries_outside_grpcs_limit_are_refused(retries):
    with pytest.raises(ValueError, match=f"retries={retries}: gRPC makes at most 5 attempts"):
        ReplayBufferClient("127.0.0.1:1", retries=retries)
