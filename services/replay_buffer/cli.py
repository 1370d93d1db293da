"""``shuffle-r1 buffer serve``: run the replay buffer service in the foreground.

Settings come from the defaults, then ``--config`` (a recipe's ``buffer`` and
``algorithm`` sections), then the flags. It prints one line ``replay buffer listening on
HOST:PORT`` when it serves, and stops on SIGTERM or SIGINT (in-flight calls get 5 s).
Secrets are best given by environment: ``$SHUFFLE_R1_BUFFER_TOKEN`` (the shared token, when
``--token`` is not given) and ``$SHUFFLE_R1_REDIS_PASSWORD`` (when the Redis URL has none);
a flag's value is visible in the process list.
Also runnable as ``python -m services.replay_buffer.cli serve ...``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import replace
from typing import Any

from services.embedded_redis import PASSWORD_ENV
from services.replay_buffer.client import TOKEN_ENV
from shuffle_r1.config import Config, ConfigError, load_config, validate

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``buffer serve`` to a CLI's subparsers; returns the ``buffer`` parser."""
    parser = subparsers.add_parser("buffer", help="the replay buffer service (gRPC + Redis)")
    commands = parser.add_subparsers(dest="buffer_command", required=True)
    s = commands.add_parser("serve", help="serve the replay buffer until SIGTERM")
    s.add_argument("--config", help="YAML recipe: its buffer and algorithm sections")
    s.add_argument(
        "--redis-url",
        help=f"redis://[:password@]host:port/db, rediss:// for TLS, or 'embedded' "
        f"(a URL without password uses ${PASSWORD_ENV})",
    )
    s.add_argument("--redis-tls-ca-cert", help="PEM CA of Redis's certificate (rediss://)")
    s.add_argument("--redis-tls-cert", help="PEM client certificate for Redis (rediss://)")
    s.add_argument("--redis-tls-key", help="PEM client key for Redis (with --redis-tls-cert)")
    s.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, help="port to bind; 0 = a free one")
    s.add_argument("--token", help=f"shared token clients must send (default: ${TOKEN_ENV})")
    s.add_argument("--tls-cert", help="PEM certificate chain of the server (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key of the server")
    s.add_argument(
        "--tls-client-ca", help="PEM CA that must sign clients' certificates (mutual TLS)"
    )
    s.add_argument("--metrics-port", type=int, help="Prometheus /metrics port; 0 = off")
    s.add_argument("--max-staleness", type=int, help="weight versions a group may lag")
    s.add_argument("--keep-steps", type=int, help="newest steps kept per run")
    s.add_argument("--max-message-mb", type=int, help="largest request or response")
    s.set_defaults(func=main)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The validated config: defaults < ``--config`` < flags. Raises :class:`ConfigError`."""
    cfg = load_config(args.config)
    flags = {
        "redis_url": args.redis_url,
        "redis_tls_ca_cert": args.redis_tls_ca_cert,
        "redis_tls_cert": args.redis_tls_cert,
        "redis_tls_key": args.redis_tls_key,
        "host": args.host,
        "port": args.port,
        "auth_token": args.token,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "tls_client_ca": args.tls_client_ca,
        "max_staleness": args.max_staleness,
        "keep_steps": args.keep_steps,
        "max_message_mb": args.max_message_mb,
        "metrics_port": args.metrics_port,
    }
    cfg.buffer = replace(cfg.buffer, **{k: v for k, v in flags.items() if v is not None})
    return validate(cfg)


def main(args: argparse.Namespace) -> int:
    """Run ``buffer serve``; returns the exit status (2 for a bad setting)."""
    # here, not at the top: the server pulls in torch, and every `shuffle-r1` command
    # (help included) builds this parser
    from services.replay_buffer.server import serve, start_embedded_redis

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"shuffle-r1 buffer serve: {exc}", file=sys.stderr)
        return 2
    buffer, embedded = start_embedded_redis(cfg.buffer)
    try:
        server, port = serve(buffer, cfg.algorithm)
    except RuntimeError as exc:
        print(f"shuffle-r1 buffer serve: {exc}", file=sys.stderr)
        if embedded is not None:
            embedded.close()
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"replay buffer listening on {buffer.host}:{port}", flush=True)
    if buffer.metrics_port:
        print(f"metrics on http://{buffer.host}:{buffer.metrics_port}/metrics", flush=True)
    stop.wait()
    log.info("stopping the replay buffer")
    server.stop(5).wait()
    if embedded is not None:
        embedded.close()
    return 0


if __name__ == "__main__":
    root = argparse.ArgumentParser(prog="python -m services.replay_buffer.cli")
    add_parser(root.add_subparsers(dest="command", required=True))
    sys.exit(main(root.parse_args(["buffer", *sys.argv[1:]])))
