"""One run's session with the replay buffer service, as the trainer holds it: put a step's
groups, draw its batch, and survive the service's two failures without losing or doubling
a group (README "Fault tolerance")."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc

from protos import replay_buffer_pb2 as pb
from services.replay_buffer.client import ReplayBufferClient
from shuffle_r1.config import BufferConfig

logger = logging.getLogger(__name__)


def connect_buffer(address: str, b: BufferConfig) -> ReplayBufferClient:
    """A client for the buffer at ``address``. With ``b.tls_cert`` it connects over TLS,
    trusting ``b.tls_ca_cert`` (or the certificate itself when that is empty), and presents
    ``b.tls_client_cert`` / ``tls_client_key`` if set; ``b.auth_token`` goes with every call."""
    return ReplayBufferClient(
        address,
        token=b.auth_token or None,
        root_cert=(b.tls_ca_cert or b.tls_cert) if b.tls_cert else None,
        max_message_mb=b.max_message_mb,
        client_cert=b.tls_client_cert or None,
        client_key=b.tls_client_key or None,
    )


class BufferSession:
    """Puts and samples of run ``run_id`` with ``spec``.

    Args:
        connect: a new client for the buffer's current address (it changes when Ray
            restarts the buffer actor: the server binds a new free port).
        run_id: the run's id (``trainer.run_name``).
        spec: the run's ``RunSpec``; the buffer refuses a put or sample under another.
        on_recovery: called with ``"reconnect"`` or ``"regenerated_step"`` each time a
            failure is recovered from (the trainer counts them).
    """

    def __init__(
        self,
        connect: Callable[[], ReplayBufferClient],
        run_id: str,
        spec: pb.RunSpec,
        on_recovery: Callable[[str], None] = lambda kind: None,
    ) -> None:
        self._connect = connect
        self.run_id = run_id
        self.spec = spec
        self.on_recovery = on_recovery
        self.client = connect()
        # trainer.mode=async puts from the producer thread while the learner's thread samples:
        # one reconnect at a time, and only of the client that failed
        self._reconnecting = threading.Lock()

    def put(self, groups: list[pb.Group]) -> Any:
        """Put groups (``PutGroupsResponse``) without drawing: the producer's half of
        :meth:`put_and_sample` in ``trainer.mode=async``, whose draw later passes this
        response as ``put``. An unreachable buffer is reconnected to once and the put redone
        (it is idempotent), as is a put whose client another thread replaced meanwhile.

        Raises:
            grpc.RpcError: any other failure, or the buffer unreachable a second time.
            ValueError: the session was closed.
        """
        reconnected = False
        while True:
            client = self.client
            try:
                return client.put_groups(groups, spec=self.spec)
            except (grpc.RpcError, ValueError) as exc:
                if self._replaced(client):
                    continue
                if isinstance(exc, ValueError):
                    raise
                code = exc.code()  # type: ignore[attr-defined]
                if code != grpc.StatusCode.UNAVAILABLE or reconnected:
                    raise
                reconnected = True
                self._reconnect(client, exc)
                self.on_recovery("reconnect")

    def put_and_sample(
        self, groups: list[pb.Group], step: int, policy_version: int, put: Any = None
    ) -> tuple[Any, Any]:
        """Put the step's groups and draw its batch (``(PutResponse, SampleResponse)``);
        ``put``: the response of an earlier :meth:`put` of the same groups (asynchronous
        mode), which is then not repeated unless the buffer lost them. Survive the buffer's
        two failures:

        - the buffer is unreachable (its actor died and Ray restarted it, on a new port):
          reconnect and redo both — a put is idempotent and the draw is deterministic per
          step, so nothing is lost or doubled;
        - the buffer lost groups it had acknowledged (Redis restarted without persistence):
          Sample refuses the short step (``expected_groups``), the buffer's stats confirm
          fewer groups than were put, and the groups are put again from memory, never
          training on a partial batch.

        Each recovery is tried once per call, then the error propagates. A call whose client
        another thread replaced meanwhile (its own reconnect) is redone on the new client.

        Raises:
            grpc.RpcError: any other failure, or one of the two a second time.
            ValueError: the session was closed.
        """
        recovered: set[str] = set()
        # put: the first acknowledged put; a retry finds the groups there (duplicates)
        while True:
            client = self.client
            try:
                put = put or client.put_groups(groups, spec=self.spec)
                sample = client.sample(
                    self.run_id,
                    step,
                    policy_version=policy_version,
                    expected_groups=len(groups),
                    spec=self.spec,
                    prompts_by_group=True,
                )
                return put, sample
            except (grpc.RpcError, ValueError) as exc:
                if self._replaced(client):
                    continue
                if isinstance(exc, ValueError):
                    raise
                kind = self._failure(client, exc, step, len(groups))
                if kind is None or kind in recovered:
                    raise
                recovered.add(kind)
                if kind == "regenerated_step":
                    put = None  # the buffer lost it: put again
                self.on_recovery(kind)

    def _replaced(self, client: ReplayBufferClient) -> bool:
        """Whether another thread reconnected since ``client`` was taken: it closed
        ``client``, so a call on it failed for that alone (gRPC's ``ValueError`` "Cannot
        invoke RPC on closed channel!", or ``CANCELLED`` for a call in flight). The caller
        redoes the call on the new client; puts are idempotent and a step's draw is
        deterministic, so nothing is doubled. Seen in ``trainer.mode=async``: the learner's
        sample reconnected after the buffer's restart while the producer's put was starting."""
        return self.client is not client

    def _reconnect(self, failed: ReplayBufferClient, exc: grpc.RpcError) -> None:
        """Replace ``failed`` with a client for the buffer's current address, unless another
        thread has done so since ``failed`` was used."""
        with self._reconnecting:
            if self.client is not failed:
                return
            logger.warning(
                "replay buffer at %s unreachable (%s); reconnecting",
                failed.address,
                exc.details(),  # type: ignore[attr-defined]
            )
            failed.close()
            self.client = self._connect()

    def _failure(
        self, client: ReplayBufferClient, exc: grpc.RpcError, step: int, expected: int
    ) -> str | None:
        """``"reconnect"`` (after reconnecting) or ``"regenerated_step"`` when ``exc``, raised
        by ``client``, is a failure :meth:`put_and_sample` recovers from, else None."""
        code = exc.code()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE:
            self._reconnect(client, exc)
            return "reconnect"
        if code not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
            return None
        try:
            stats = self.client.stats(self.run_id)
            held = next((s.groups_accepted for s in stats.steps if s.step == step), 0)
        except grpc.RpcError as stats_exc:
            if stats_exc.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                raise
            held = 0  # the buffer does not know the run any more
        if held >= expected:
            return None  # not a loss: a real precondition failure (another spec, ...)
        logger.warning(
            "replay buffer holds %d of step %d's %d groups (%s); putting them again",
            held,
            step,
            expected,
            exc.details(),  # type: ignore[attr-defined]
        )
        return "regenerated_step"

    def drop_run(self) -> None:
        """Delete everything the buffer holds for the run (a fresh start, or the steps after
        a checkpoint that a resumed run puts again)."""
        self.client.drop_run(self.run_id)

    def close(self) -> None:
        self.client.close()
