"""The trainer's buffer session against a real buffer server: in ``trainer.mode=async`` the
producer's thread puts while the learner's thread samples, and one thread's reconnect closes
the client the other has just taken. Seen in a full suite run: the async faults run's
producer failed with gRPC's "Cannot invoke RPC on closed channel!" right after the buffer's
restart. The call is redone on the new client, once, with nothing doubled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from buffer_helpers import random_groups

from protos import replay_buffer_pb2 as pb
from services.replay_buffer.client import ReplayBufferClient
from services.replay_buffer.session import BufferSession
from shuffle_r1.net import free_port

SPEC = pb.RunSpec(algorithm="shuffle_r1", keep_ratio=0.5, shuffle_times=2, seed=0)


def unavailable() -> grpc.RpcError:
    """A real UNAVAILABLE error: a call to a port nothing listens on."""
    with ReplayBufferClient(f"127.0.0.1:{free_port()}", timeout_s=2, retries=0) as nowhere:
        try:
            nowhere.stats("nobody")
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            return exc
    raise AssertionError("a call to a closed port succeeded")


def reconnect_first(session: BufferSession, method: str) -> tuple[ReplayBufferClient, list[int]]:
    """Make the session's current client run another thread's reconnect (the real
    ``_reconnect`` after a real UNAVAILABLE) just before its next ``method`` call; returns
    that client and a list that counts the calls it was asked for."""
    stale = session.client
    original: Callable[..., Any] = getattr(stale, method)
    error = unavailable()
    calls: list[int] = []

    def other_thread_reconnects_first(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        session._reconnect(stale, error)  # closes ``stale``: this call fails for that alone
        return original(*args, **kwargs)

    setattr(stale, method, other_thread_reconnects_first)
    return stale, calls


@pytest.fixture
def session(buffer: Any, run_id: str) -> BufferSession:
    recoveries: list[str] = []
    made = BufferSession(
        lambda: ReplayBufferClient(buffer.address, token=buffer.cfg.auth_token, retries=0),
        run_id,
        SPEC,
        recoveries.append,
    )
    made.recoveries = recoveries  # type: ignore[attr-defined]
    yield made
    made.close()


def test_a_put_on_a_client_another_thread_replaced_is_redone_on_the_new_one(
    session: BufferSession, run_id: str
) -> None:
    groups = random_groups(run_id, 0, 4)
    stale, calls = reconnect_first(session, "put_groups")
    put = session.put(groups)
    assert calls == [1] and session.client is not stale
    assert put.stored == 4
    assert session.recoveries == []  # type: ignore[attr-defined]  # not this thread's reconnect
    again = session.client.put_groups(groups, spec=SPEC)  # stored once: a retry finds them
    assert (again.stored, again.duplicates) == (0, 4)


def test_a_sample_on_a_client_another_thread_replaced_is_redone_on_the_new_one(
    session: BufferSession, run_id: str
) -> None:
    groups = random_groups(run_id, 0, 4)
    put = session.put(groups)
    stale, calls = reconnect_first(session, "sample")
    again, sample = session.put_and_sample(groups, step=0, policy_version=0, put=put)
    assert calls == [1] and session.client is not stale
    assert again is put  # not put a second time
    assert sample.groups == 4 and len(sample.items) > 0
    assert session.recoveries == []  # type: ignore[attr-defined]


def test_a_closed_session_still_raises(session: BufferSession, run_id: str) -> None:
    session.close()
    with pytest.raises(ValueError, match="closed channel"):
        session.put(random_groups(run_id, 0, 1))
