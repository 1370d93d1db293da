"""The replay buffer inside a Ray actor, for in-cluster use.

The actor owns the gRPC server (and, for ``redis_url="embedded"``, a private Redis);
callers ask it for :meth:`ReplayBufferHost.address` and talk gRPC with
:class:`~services.replay_buffer.client.ReplayBufferClient`. Start it with
:func:`start_replay_buffer_actor`, which sets ``max_restarts`` so Ray restarts a dead
actor; the state lives in Redis, so a restarted actor serves the same data (with
``port=0`` on a new port: ask :meth:`address` again after a failure). As ``shuffle-r1 buffer
serve``, it serves Prometheus ``/metrics`` on ``buffer.metrics_port`` when that is > 0, and
takes the token and the Redis password from the environment when the config has none
(:func:`~services.replay_buffer.server.serve`).
"""

from __future__ import annotations

from typing import Any

import ray

from services.replay_buffer.server import serve, start_embedded_redis
from shuffle_r1.config import AlgorithmConfig, BufferConfig


class ReplayBufferHost:
    """Hosts one replay buffer server in the current process (the actor's)."""

    def __init__(self, buffer: BufferConfig, algorithm: AlgorithmConfig) -> None:
        buffer, self._embedded = start_embedded_redis(buffer)
        self._server, self._port = serve(buffer, algorithm)
        host = buffer.host
        if host in ("", "0.0.0.0", "::", "[::]"):
            host = ray.util.get_node_ip_address()
        self._address = f"{host}:{self._port}"

    def address(self) -> str:
        """``host:port`` where the server listens (a reachable IP if bound to all)."""
        return self._address

    def stop(self, grace_s: float = 5.0) -> None:
        """Stop serving (in-flight calls get ``grace_s`` seconds) and the embedded Redis."""
        self._server.stop(grace_s).wait()
        if self._embedded is not None:
            self._embedded.close()


def start_replay_buffer_actor(
    buffer: BufferConfig,
    algorithm: AlgorithmConfig,
    *,
    name: str | None = None,
    max_restarts: int = -1,
    num_cpus: float = 0.0,
) -> Any:
    """Create the :class:`ReplayBufferHost` actor on the head node; returns its handle.

    ``max_restarts=-1``: Ray restarts it whenever it dies; method calls are retried across
    restarts. ``name`` makes it findable with ``ray.get_actor``. The head node (Ray's
    ``node:__internal_head__`` resource) is where the trainer runs and where a KubeRay
    deployment exposes the buffer's metrics port.
    """
    actor_class = ray.remote(ReplayBufferHost)
    return actor_class.options(  # type: ignore[attr-defined]
        name=name,
        max_restarts=max_restarts,
        max_task_retries=-1,
        num_cpus=num_cpus,
        resources={"node:__internal_head__": 0.001},
    ).remote(buffer, algorithm)
