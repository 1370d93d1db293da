"""Who may call the replay buffer: the shared token (every call but Health) and TLS.

The token travels as metadata ``authorization: Bearer <token>`` and is compared in constant
time; a call without it is answered UNAUTHENTICATED and counted in
``shuffle_r1_buffer_requests_total``. TLS, and mutual TLS with a client CA, come from the
``buffer.tls_*`` PEM files.
"""

from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from services.replay_buffer.metrics import BufferMetrics
from shuffle_r1.config import BufferConfig

_HEALTH_PREFIX = "/grpc.health.v1.Health/"


class TokenInterceptor(grpc.ServerInterceptor):
    """Requires metadata ``authorization: Bearer <token>`` on every call but Health."""

    def __init__(self, token: str, metrics: BufferMetrics) -> None:
        self._expected = f"Bearer {token}".encode()
        self._metrics = metrics

        def deny(raw: bytes, context: grpc.ServicerContext) -> None:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong token: send metadata 'authorization: Bearer <token>'",
            )

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, details):  # type: ignore[no-untyped-def]
        if details.method.startswith(_HEALTH_PREFIX):
            return continuation(details)
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and hmac.compare_digest(
                value.encode() if isinstance(value, str) else value, self._expected
            ):
                return continuation(details)
        method = details.method.rsplit("/", 1)[-1]
        self._metrics.requests.labels(method, grpc.StatusCode.UNAUTHENTICATED.name).inc()
        return self._deny


def server_credentials(cfg: BufferConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from ``cfg.tls_key`` and ``cfg.tls_cert``, requiring a client
    certificate signed by ``cfg.tls_client_ca`` when that is set; None without
    ``cfg.tls_cert`` (plain TCP)."""
    if not cfg.tls_cert:
        return None
    return grpc.ssl_server_credentials(
        [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())],
        root_certificates=Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None,
        require_client_auth=bool(cfg.tls_client_ca),
    )
