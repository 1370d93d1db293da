"""A Python client of the replay buffer, for the trainer, actors and anyone outside Ray."""

from __future__ import annotations

import json
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
MAX_ATTEMPTS = 5  # gRPC's limit on retryPolicy.maxAttempts
SERVICES = ("shuffle_r1.buffer.v1.ReplayBuffer", "grpc.health.v1.Health")
TOKEN_ENV = BUFFER_TOKEN_ENV  # the shared token, for servers and clients


class ReplayBufferClient:
    """Blocking client of ``shuffle_r1.buffer.v1.ReplayBuffer``; thread-safe.

    gRPC retries every call itself (the channel's ``retryPolicy``, gRFC A6): up to
    ``retries`` more attempts after an attempt that answers UNAVAILABLE (the server is not
    reachable, or its Redis is down) or that gets no answer within ``timeout_s``
    (``perAttemptRecvTimeout``), the n-th retry after ``backoff_s * 2**(n-1)`` seconds
    (±20 %, gRPC's jitter). That is safe: a put is idempotent per (run, step, prompt_id),
    a Sample of a step returns the same batch (the run's cursor counts every attempt that
    reached Redis), Stats reads, DropRun is idempotent. Other errors raise
    ``grpc.RpcError`` at once; ``.code()`` and ``.details()`` say what failed.

    The whole call has a deadline of ``(retries + 1) * timeout_s`` plus the shortest
    backoffs, so a call none of whose attempts was answered in time ends with
    DEADLINE_EXCEEDED (the per-attempt timer alone would end it with CANCELLED). gRPC does
    not report its retries; a call that finally fails with UNAVAILABLE or DEADLINE_EXCEEDED
    is logged once, with the attempts allowed and the time spent.

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
        retries: further attempts after a retryable failure, 0 to 4 (gRPC makes at most
            5 attempts of a call and would silently clamp more; more are refused).
        max_message_mb: largest message sent or received (a batch can be large); gRPC
            keeps a sent message this large for its retries (by default it keeps 256 KiB
            and does not retry a call that sent more).
        backoff_s: wait before the first retry, seconds (> 0 when ``retries`` > 0).

    Raises:
        ValueError: ``retries``, ``timeout_s`` or ``backoff_s`` out of range, or TLS
            files given in a combination that cannot work.
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
        if not 0 <= retries <= MAX_ATTEMPTS - 1:
            raise ValueError(
                f"retries={retries}: gRPC makes at most {MAX_ATTEMPTS} attempts of a call, "
                f"so retries must be in 0..{MAX_ATTEMPTS - 1}"
            )
        if timeout_s <= 0 or (retries and backoff_s <= 0):
            raise ValueError(
                f"timeout_s={timeout_s} and backoff_s={backoff_s} (with retries) must be > 0"
            )
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", max_message_mb * 2**20),
            ("grpc.max_send_message_length", max_message_mb * 2**20),
        ]
        self.deadline_s = timeout_s
        if retries:
            options += _retry_options(retries, backoff_s, timeout_s, max_message_mb)
            # the shortest the backoffs can be: the last attempt's own timer never fires first
            self.deadline_s += retries * timeout_s + 0.8 * backoff_s * (2**retries - 1)
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
        self.retries = retries

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
        prompts_by_group: bool = False,
    ) -> pb.SampleResponse:
        """The training batch of ``step``: items in training order, pairs adjacent, each
        with the probability its pair was drawn with (docs/algorithm.md §3).

        ``prompts_by_group``: each group's prompt token ids come once, in
        ``response.prompts[prompt_id]``, and the items' ``prompt_token_ids`` are empty
        (:func:`item_prompts` gives them per item either way)."""
        request = pb.SampleRequest(
            run_id=run_id,
            step=step,
            policy_version=policy_version,
            expected_groups=expected_groups,
            spec=spec,
            prompts_by_group=prompts_by_group,
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
        started = time.monotonic()
        try:
            return method(request, timeout=self.deadline_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            if self.retries and code in RETRYABLE:
                log.warning(
                    "replay buffer at %s: %s after %.2f s and up to %d attempts (%s)",
                    self.address, code.name, time.monotonic() - started, self.retries + 1,
                    exc.details(),  # type: ignore[attr-defined]
                )  # fmt: skip
            raise

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ReplayBufferClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def item_prompts(sample: pb.SampleResponse) -> list[list[int]]:
    """Each item's prompt token ids, in item order, whether the response carries them per
    item or once per group (``SampleRequest.prompts_by_group``); the items of one group
    share one list under the latter.

    Raises:
        ValueError: an item's prompt is in neither place (a server that left it out).
    """
    if not sample.prompts:
        return [list(item.prompt_token_ids) for item in sample.items]
    prompts = {pid: list(p.token_ids) for pid, p in sample.prompts.items()}
    try:
        return [prompts[item.prompt_id] for item in sample.items]
    except KeyError as exc:
        raise ValueError(
            f"step {sample.step}: the response has no prompt for group {exc.args[0]!r}"
        ) from None


def _pem(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes given as such or as a file path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


def _retry_options(
    retries: int, backoff_s: float, timeout_s: float, max_message_mb: int
) -> list[tuple[str, Any]]:
    """Channel options that make gRPC retry every method of :data:`SERVICES`: ``retries``
    more attempts after UNAVAILABLE or an attempt unanswered for ``timeout_s``."""
    policy = {
        "maxAttempts": retries + 1,
        "initialBackoff": f"{backoff_s:.9f}s",
        "maxBackoff": f"{backoff_s * 2 ** (retries - 1):.9f}s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
        "perAttemptRecvTimeout": f"{timeout_s:.9f}s",  # an expired one is always retried
    }
    config = {"methodConfig": [{"name": [{"service": s} for s in SERVICES], "retryPolicy": policy}]}
    return [
        ("grpc.service_config", json.dumps(config)),
        ("grpc.enable_retries", 1),
        # gRPC (1.85) reads perAttemptRecvTimeout only with hedging enabled (no hedgingPolicy
        # is set); test_grpc_retries.py fails if it stops reading it
        ("grpc.experimental.enable_hedging", 1),
        ("grpc.per_rpc_retry_buffer_size", max_message_mb * 2**20),
    ]
