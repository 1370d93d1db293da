"""The replay buffer server: starts the gRPC server on a Redis store and watches Redis.

:func:`serve` checks the config, connects the :class:`~.store.BufferStore`, and serves the
:class:`~.servicer.ReplayBufferServicer` (what each RPC answers), behind the shared token and
TLS of :mod:`.auth`, with the Prometheus metrics of :mod:`.metrics`.

Health: the standard ``grpc.health.v1.Health`` service answers SERVING while Redis accepts
a write (checked every ``buffer.health_check_s``) and NOT_SERVING while it does not answer
or refuses writes (``maxmemory`` reached under the noeviction policy, a read-only replica):
then every put would fail.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from concurrent import futures
from dataclasses import replace
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, start_http_server

from services.embedded_redis import PASSWORD_ENV, EmbeddedRedis, RedisTLS, redact
from services.replay_buffer.auth import TokenInterceptor, server_credentials
from services.replay_buffer.client import TOKEN_ENV
from services.replay_buffer.metrics import BufferMetrics
from services.replay_buffer.servicer import SERVICE_NAME, ReplayBufferServicer
from services.replay_buffer.store import BufferStore
from shuffle_r1.config import AlgorithmConfig, BufferConfig

log = logging.getLogger(__name__)


def serve(
    cfg: BufferConfig,
    algo: AlgorithmConfig,
    *,
    registry: CollectorRegistry | None = None,
    max_workers: int = 16,
) -> tuple[BufferServer, int]:
    """Start a replay buffer server; return it (started) and its port.

    Binds ``cfg.host:cfg.port`` (port 0 = a free one; the default host is loopback) without
    SO_REUSEPORT, so a port another process holds is an error, not a shared port. TLS if
    ``cfg.tls_cert`` and ``cfg.tls_key`` (PEM file paths) are set; with ``cfg.tls_client_ca``
    too, a client must present a certificate that CA signed (mutual TLS). Every call but
    Health needs the shared token ``cfg.auth_token``, or ``$SHUFFLE_R1_BUFFER_TOKEN`` if that
    is empty (no token if both are). Redis is ``cfg.redis_url`` with ``cfg.redis_tls_*``
    (password: see :func:`services.embedded_redis.redis_client`). Algorithm defaults of new
    runs come from ``algo``. Metrics go to ``registry`` (a private one if None), served as
    Prometheus ``/metrics`` on ``cfg.host:cfg.metrics_port`` if that is > 0.

    A thread writes to Redis every ``cfg.health_check_s`` seconds (:meth:`BufferStore.probe`)
    and sets the health status (service "" and the ReplayBuffer service) to NOT_SERVING
    while the write fails and to SERVING when it succeeds again. ``server.stop(grace)``
    stops it all: the event it returns is set once the gRPC server, the thread and the
    metrics endpoint have ended.

    Raises:
        RuntimeError: a PEM file of the config does not exist; Redis does not answer at
            ``cfg.redis_url``, refuses the password or the TLS handshake; the port (e.g.
            held by another buffer) or the metrics port cannot be bound;
            ``cfg.tls_client_ca`` without ``cfg.tls_cert``. The message names the key, the
            (redacted) URL or the address.
    """
    url = redact(cfg.redis_url)
    keys = ("tls_cert", "tls_key", "tls_client_ca", "redis_tls_ca_cert", "redis_tls_cert",
            "redis_tls_key")  # fmt: skip
    for key in keys:
        path = getattr(cfg, key)
        if path and not Path(path).is_file():
            raise RuntimeError(f"buffer.{key}={path!r}: no such file (a PEM file is expected)")
    if cfg.tls_client_ca and not cfg.tls_cert:
        raise RuntimeError(
            "buffer.tls_client_ca is set but buffer.tls_cert is not: client certificates are "
            "checked only over TLS; set buffer.tls_cert and buffer.tls_key too"
        )
    try:
        store = BufferStore(
            cfg.redis_url,
            tls=RedisTLS(cfg.redis_tls_ca_cert, cfg.redis_tls_cert, cfg.redis_tls_key),
            keep_steps=cfg.keep_steps,
            max_staleness=cfg.max_staleness,
        )
    except ValueError as exc:
        raise RuntimeError(f"the replay buffer cannot use Redis: {exc}") from exc
    try:
        store.ping()
    except redis.AuthenticationError as exc:
        store.close()
        raise RuntimeError(
            f"Redis at {url} refused to authenticate the replay buffer ({exc}): give its "
            f"password in buffer.redis_url (redis://:PASSWORD@host:port/db) or ${PASSWORD_ENV}"
        ) from exc
    except redis.RedisError as exc:
        store.close()
        tls_hint = (
            "; check buffer.redis_tls_ca_cert (the CA of Redis's certificate), and "
            "redis_tls_cert/redis_tls_key if Redis asks for a client certificate"
            if cfg.redis_url.startswith("rediss://")
            else ""
        )
        raise RuntimeError(
            f"the replay buffer cannot reach Redis at {url}: {exc}; start one or pass "
            f"--redis-url (or 'embedded'){tls_hint}"
        ) from exc
    token = cfg.auth_token or os.environ.get(TOKEN_ENV, "")
    metrics = BufferMetrics(registry)
    max_bytes = cfg.max_message_mb * 2**20
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="buffer"),
        interceptors=[TokenInterceptor(token, metrics)] if token else [],
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            # gRPC sets SO_REUSEPORT by default: a second server on the port would start
            # and silently take part of the traffic
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers(
        (ReplayBufferServicer(store, algo, metrics, max_bytes).handlers(),)
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{cfg.host}:{cfg.port}"
    try:
        credentials = server_credentials(cfg)
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
        if port == 0:
            raise RuntimeError("no port bound")
    except RuntimeError as exc:  # grpcio raises, or returns 0, for a port it cannot bind
        store.close()
        raise RuntimeError(
            f"the replay buffer cannot bind {address} ({exc}): is another process (another "
            "buffer?) listening there? Choose another buffer.port, or 0 for a free one"
        ) from exc
    exporter = None
    if cfg.metrics_port:
        try:
            exporter, _ = start_http_server(
                cfg.metrics_port, addr=cfg.host, registry=metrics.registry
            )
        except OSError as exc:
            server.stop(None)
            store.close()
            raise RuntimeError(
                f"the replay buffer cannot serve metrics on {cfg.host}:{cfg.metrics_port}: "
                f"{exc} (buffer.metrics_port)"
            ) from exc
    # What the process holds by now (torch, protobuf, grpc: ~200,000 objects) stays for its
    # life: keep it out of the garbage collector's full passes, which took ~100 ms when a put
    # set one off (the put's p99 in bench/buffer.py)
    gc.freeze()
    server.start()
    for service in ("", SERVICE_NAME):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    watcher = threading.Thread(
        target=_watch_redis,
        args=(server, store, health_servicer, metrics, cfg.health_check_s, exporter),
        name="buffer-health",
        daemon=True,
    )
    watcher.start()
    log.info(
        "replay buffer on %s:%d (Redis %s, keep_steps=%d, max_staleness=%d, tls=%s, "
        "client certificates=%s, token=%s, metrics=%s)",
        cfg.host, port, url, cfg.keep_steps, cfg.max_staleness, bool(cfg.tls_cert),
        bool(cfg.tls_client_ca), bool(token),
        f"{cfg.host}:{cfg.metrics_port}" if exporter else "off",
    )  # fmt: skip
    return BufferServer(server, watcher), port


class BufferServer:
    """A running replay buffer: the gRPC server and the thread that watches Redis (and,
    when it ends, stops the metrics endpoint and closes the Redis connections)."""

    def __init__(self, server: grpc.Server, watcher: threading.Thread) -> None:
        self.grpc_server = server
        self._watcher = watcher

    def stop(self, grace: float | None) -> threading.Event:
        """Stop serving; in-flight calls get ``grace`` seconds (None: they are cancelled).
        The returned event is set when everything has ended."""
        stopped = threading.Event()
        terminated = self.grpc_server.stop(grace)

        def finish() -> None:
            terminated.wait()
            self._watcher.join()
            stopped.set()

        threading.Thread(target=finish, name="buffer-stop", daemon=True).start()
        return stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped, or ``timeout``; True if it timed out."""
        return bool(self.grpc_server.wait_for_termination(timeout))


def _watch_redis(
    server: grpc.Server,
    store: BufferStore,
    health_servicer: health.HealthServicer,
    metrics: BufferMetrics,
    period_s: float,
    exporter: WSGIServer | None,
) -> None:
    """Until ``server`` terminates: write to Redis every ``period_s`` and keep the health
    status in step with whether it succeeds. Then stop the metrics endpoint and close the
    store."""
    serving = True
    while server.wait_for_termination(timeout=period_s):  # True: timed out, still running
        try:
            store.probe(expire_s=max(5.0, 3 * period_s))
            answers, reason = True, ""
        except redis.RedisError as exc:
            metrics.redis_errors.labels("health").inc()
            answers, reason = False, f"{type(exc).__name__}: {exc}"
        if answers != serving:
            serving = answers
            status = health_pb2.HealthCheckResponse.SERVING if answers else (
                health_pb2.HealthCheckResponse.NOT_SERVING
            )  # fmt: skip
            for service in ("", SERVICE_NAME):
                health_servicer.set(service, status)
            if answers:
                log.info("Redis at %s accepts writes again: health SERVING", redact(store.url))
            else:
                log.warning(
                    "Redis at %s does not accept a write (%s): health NOT_SERVING",
                    redact(store.url), reason,
                )  # fmt: skip
    if exporter is not None:
        exporter.shutdown()
        exporter.server_close()
    store.close()


def start_embedded_redis(cfg: BufferConfig) -> tuple[BufferConfig, EmbeddedRedis | None]:
    """For ``redis_url == "embedded"``: start a private Redis; return the config pointing at
    it and the handle (stop it with ``close()``). Otherwise ``(cfg, None)``. The embedded
    Redis keeps no data on disk: it lives as long as its owner.
    """
    if cfg.redis_url != "embedded":
        return cfg, None
    embedded = EmbeddedRedis().start()
    return replace(cfg, redis_url=embedded.url), embedded
