"""Ray Serve plumbing shared by the rollout and reward roles (both are Serve applications).

- :func:`ensure_serve` starts Serve on the cluster once (HTTP proxy on the head node, bound to
  the address asked for: loopback by default) and says where its HTTP proxy listens;
  :func:`proxy_host` says which address it is bound to;
- :func:`replica_counts` and :func:`set_num_replicas` read and change a deployment's size
  (the latter through Serve's external-scaler API, for deployments deployed with
  ``external_scaler_enabled``);
- :func:`dispatch` sends chunks of work to a deployment and re-sends the chunks whose replica
  died, which both pools need.

Serve does not retry a request whose replica dies: the response raises ``RayActorError``
(``ActorDiedError``), and the controller starts a replacement. A replica that Serve stops on a
downscale first finishes its ongoing requests (``graceful_shutdown_timeout_s``), so a chunk
is only re-sent when its replica crashed.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ray import serve
from ray.exceptions import RayActorError

from shuffle_r1.net import free_port

logger = logging.getLogger(__name__)

# Serve's own INFO lines (one per request) would drown a training run's console.
LOGGING = {"log_level": "WARNING", "enable_access_log": False}
# Serve's controller replaces a crashed replica after its next failed health check (the
# rollout and reward deployments).
HEALTH_CHECK_PERIOD_S = 2.0

T = TypeVar("T")


def worker_id() -> str:
    """The Serve replica id inside a replica, else ``actor-<pid>`` (a plain actor, a test)."""
    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # not inside a Serve replica: Serve raises RayServeException
        return f"actor-{os.getpid()}"


def ensure_serve(http_host: str = "127.0.0.1", http_port: int = 8000) -> str:
    """Start Serve on the connected Ray cluster unless it runs; return its HTTP base URL.

    The HTTP proxy runs on the head node only, bound to ``http_host:http_port``
    (``http_port`` 0 = a free port; the default host, loopback, keeps it to this machine).
    Serve keeps the options it was first started with: when it already runs, the URL is where
    it actually listens, whatever was asked (:func:`proxy_host` says the address it binds).
    """
    from ray.serve.config import HTTPOptions, ProxyLocation

    client = _client()
    if client is None:
        port = http_port or free_port(http_host)
        serve.start(
            proxy_location=ProxyLocation.HeadOnly,
            http_options=HTTPOptions(host=http_host, port=port),
            logging_config=LOGGING,
        )
        client = _client()
    assert client is not None
    options = client.http_config
    host = "127.0.0.1" if options.host in ("0.0.0.0", "::", "") else options.host
    return f"http://{host}:{options.port}"


def proxy_host() -> str:
    """The address Serve's HTTP proxy is bound to (``0.0.0.0`` = every interface); Serve must
    run (:func:`ensure_serve`)."""
    client = _client()
    if client is None:
        raise RuntimeError("Ray Serve is not running on this cluster: call ensure_serve first")
    return str(client.http_config.host)


def _client() -> Any:
    """Serve's client of the cluster's controller, or None when Serve is not running."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False)


def replica_counts(app: str, deployment: str) -> dict[str, int]:
    """Replicas of ``deployment`` in ``app`` by state (``RUNNING``, ``STARTING``, ...);
    empty when the application does not exist."""
    status = serve.status().applications.get(app)
    if status is None or deployment not in status.deployments:
        return {}
    return {str(k): int(v) for k, v in status.deployments[deployment].replica_states.items()}


def running_replicas(app: str, deployment: str) -> int:
    return replica_counts(app, deployment).get("RUNNING", 0)


def set_num_replicas(app: str, deployment: str, num_replicas: int) -> None:
    """Set the target number of replicas of a deployment deployed with
    ``external_scaler_enabled=True`` (Serve's external-scaler API; returns at once, Serve
    starts or drains replicas asynchronously).

    Raises:
        ValueError: the application does not exist, or it autoscales (Serve refuses external
            scaling there); the message says which.
    """
    from ray.serve._private.common import DeploymentID

    client = _client()
    if client is None:
        raise ValueError("Ray Serve is not running on this cluster: no deployment to scale")
    import ray

    try:
        ray.get(
            client._controller.update_deployment_replicas.remote(
                DeploymentID(name=deployment, app_name=app), num_replicas
            )
        )
    except Exception as exc:  # the controller raises ValueError / ExternalScalerDisabledError
        raise ValueError(f"cannot scale {app}/{deployment} to {num_replicas}: {exc}") from exc


def wait_for_replicas(
    app: str, deployment: str, num_replicas: int, timeout_s: float, handle: Any = None
) -> None:
    """Block until exactly ``num_replicas`` replicas run and none starts or stops; with
    ``handle`` (the deployment's, with a ``ping`` method) also until that many answer a
    broadcast ``ping`` — the controller notices a crashed replica only at its next health
    check, the handle's router at once.

    Raises:
        TimeoutError: not reached within ``timeout_s`` seconds; names the states seen.
    """
    deadline = time.monotonic() + timeout_s
    counts: dict[str, int] = {}
    answered = -1
    while time.monotonic() < deadline:
        counts = replica_counts(app, deployment)
        if counts.get("RUNNING", 0) == num_replicas and sum(counts.values()) == num_replicas:
            if handle is None:
                return
            answered = len(handle.broadcast("ping").results())
            if answered == num_replicas:
                return
        time.sleep(0.2)
    raise TimeoutError(
        f"{app}/{deployment}: {num_replicas} running replicas not reached in {timeout_s:.0f} s; "
        f"replicas by state: {counts}" + (f", {answered} answered a ping" if handle else "")
    )


@dataclass(frozen=True)
class Dispatched:
    """What :func:`dispatch` returns: one result per chunk, in chunk order, and how many
    items were re-sent because their replica died."""

    results: list[Any]
    resent_items: int


def dispatch(
    call: Callable[[list[T]], Any],
    chunks: Sequence[list[T]],
    max_resends: int,
    what: str,
    progress: Callable[[int], None] | None = None,
) -> Dispatched:
    """Send every chunk with ``call(chunk)`` (a Serve handle method's ``.remote`` partially
    applied, returning a ``DeploymentResponse``) and wait for all.

    A chunk whose replica died (``RayActorError``) is sent again, to whichever replica Serve
    routes it, up to ``max_resends`` rounds. Any other error raised by a replica propagates.
    ``progress(items)`` is told the items still unanswered, at the start and after each
    chunk (the rollout queue depth).

    Raises:
        RuntimeError: chunks still failed after ``max_resends`` re-sends; ``what`` names the
            role in the message.
    """
    results: list[Any] = [None] * len(chunks)
    pending = [i for i, chunk in enumerate(chunks) if chunk]
    resent = 0
    remaining = sum(len(chunks[i]) for i in pending)
    if progress is not None:
        progress(remaining)
    for attempt in range(max_resends + 1):
        responses = [(i, call(chunks[i])) for i in pending]
        lost = []
        for i, response in responses:
            try:
                results[i] = response.result()
                remaining -= len(chunks[i])
                if progress is not None:
                    progress(remaining)
            except RayActorError as exc:
                logger.warning("%s replica died serving chunk %d: %s", what, i, _first_line(exc))
                lost.append(i)
        if not lost:
            return Dispatched(results, resent)
        if attempt == max_resends:
            break
        resent += sum(len(chunks[i]) for i in lost)
        pending = lost
    raise RuntimeError(
        f"{what}: {len(lost)} chunks failed after {max_resends} re-sends (replicas keep dying; "
        "see the Ray logs of the Serve replicas)"
    )


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def split(items: Sequence[T], parts: int) -> list[list[T]]:
    """``items`` in ``parts`` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        chunks.append(list(items[start:end]))
        start = end
    return chunks
