"""A Python client of the replay buffer, for the trainer, actors and anyone outside Ray."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import replay_buffer_pb2 as pb
from protos import replay_buffer_pb2_grpc as pb_grpc
from shuffle_r1.config import BUFFER_TOKEN_ENV

log = logging.getLogger(__name__)

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
TOKEN_ENV = BUFFER_TOKEN_ENV  # the shared token, for servers and clients


class ReplayBufferClient:
    """Blocking client of ``shuffle_r1.buffer.v1.ReplayBuffer``; thread-safe.

    Every call is retried on UNAVAILABLE and DEADLINE_EXCEEDED, ``retries`` times with
    exponential backoff from ``backoff_s``. That is safe: a put is idempotent per (run,
    step, prompt_id), a Sample of a step returns the same batch (the run's cursor counts
    every attempt that reached Redis), Stats reads, DropRun is idempotent. Other errors raise
    ``grpc.RpcError`` at once; ``.code()`` and ``.details()`` say what failed.

    Args:
        address: ``host:port`` of the server.
        token: the shared token, sent as ``authorization: Bearer <token>``; None (the
            default) takes ``$SHUFFLE_R1_BUFFER_TOKEN`` as the server does, "" sends none.
        root_cert: PEM bytes, or a path to them, of the CA that signed the server's
            certificate; set it to connect with TLS.
        client_cert, client_key: PEM bytes, or paths, of this client's certificate chain
            and private key, for a server that requires one (mutual TLS,
            ``buffer.tls_client_ca``); with ``root_cert`` only, both or neither.
        timeout_s: deadline of each attempt, seconds.
        retries: further attempts after a retryable failure.
        max_message_mb: largest message sent or received (a batch can be large).
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        root_cert: bytes | str | Path | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        max_message_mb: int = 256,
        backoff_s: float = 0.1,
        client_cert: bytes | str | Path | None = None,
        client_key: bytes | str | Path | None = None,
    ) -> None:
        if (client_cert is None) != (client_key is None) or (
            client_cert is not None and root_cert is None
        ):
            raise ValueError(
                "client_cert and client_key go together, and with root_cert (mutual TLS)"
            )
        options = [
            ("grpc.max_receive_message_length", max_message_mb * 2**20),
            ("grpc.max_send_message_length", max_message_mb * 2**20),
        ]
        if root_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_pem(root_cert),
                private_key=_pem(client_key),
                certificate_chain=_pem(client_cert),
            )
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self.address = address
        self._stub = pb_grpc.ReplayBufferStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        if token is None:
            token = os.environ.get(TOKEN_ENV, "")
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def put_groups(
        self, groups: Iterable[pb.Group], spec: pb.RunSpec | None = None
    ) -> pb.PutGroupsResponse:
        """Store groups of one run (see ``PutGroups`` in the proto); per-group statuses."""
        return self._call(self._stub.PutGroups, pb.PutGroupsRequest(groups=groups, spec=spec))

    def sample(
        self,
        run_id: str,
        step: int,
        policy_version: int,
        expected_groups: int = 0,
        spec: pb.RunSpec | None = None,
    ) -> pb.SampleResponse:
        """The training batch of ``step``: items in training order, pairs adjacent, each
        with the probability its pair was drawn with (docs/algorithm.md §3)."""
        request = pb.SampleRequest(
            run_id=run_id,
            step=step,
            policy_version=policy_version,
            expected_groups=expected_groups,
            spec=spec,
        )
        return self._call(self._stub.Sample, request)

    def stats(
        self, run_id: str, step: int | None = None, histogram_bins: int = 0
    ) -> pb.StatsResponse:
        """Sizes, counters, cursor and the §5 diagnostics of ``step`` (default: newest)."""
        request = pb.StatsRequest(run_id=run_id, step=step, histogram_bins=histogram_bins)
        return self._call(self._stub.Stats, request)

    def drop_run(self, run_id: str) -> pb.DropRunResponse:
        """Delete everything of ``run_id``."""
        return self._call(self._stub.DropRun, pb.DropRunRequest(run_id=run_id))

    def health(self, service: str = "") -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
        """The standard gRPC health status (SERVING = 1) of ``service`` ("" = the server)."""
        request = health_pb2.HealthCheckRequest(service=service)
        return self._call(self._health.Check, request).status

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
                if code not in RETRYABLE or attempt == self.retries:
                    raise
                delay = self.backoff_s * 2**attempt
                log.warning(
                    "replay buffer at %s: %s (%s); retry %d/%d in %.2f s",
                    self.address, code.name, exc.details(), attempt + 1, self.retries, delay,  # type: ignore[attr-defined]
                )  # fmt: skip
                time.sleep(delay)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ReplayBufferClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pem(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes given as such or as a file path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()
