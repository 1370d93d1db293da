"""``shuffle-r1 buffer serve``: run the replay buffer service in the foreground.

Settings come from the defaults, then ``--config`` (a recipe's ``buffer`` and
``algorithm`` sections), then the flags. It prints one line ``replay buffer listening on
HOST:PORT`` when it serves, and stops on SIGTERM or SIGINT (in-flight calls get 5 s).
Also runnable as ``python -m services.replay_buffer.cli serve ...``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from services.replay_buffer.server import serve, start_embedded_redis
from shuffle_r1.config import Config, ConfigError, load_config, validate

TOKEN_ENV = "SHUFFLE_R1_BUFFER_TOKEN"

log = logging.getLogger(__name__)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``buffer serve`` to a CLI's subparsers; returns the ``buffer`` parser."""
    parser = subparsers.add_parser("buffer", help="the replay buffer service (gRPC + Redis)")
    commands = parser.add_subparsers(dest="buffer_command", required=True)
    s = commands.add_parser("serve", help="serve the replay buffer until SIGTERM")
    s.add_argument("--config", help="YAML recipe: its buffer and algorithm sections")
    s.add_argument("--redis-url", help="redis://[:password@]host:port/db, or 'embedded'")
    s.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, help="port to bind; 0 = a free one")
    s.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"shared token clients must send (default: ${TOKEN_ENV})",
    )
    s.add_argument("--tls-cert", help="PEM certificate chain of the server (with --tls-key)")
    s.add_argument("--tls-key", help="PEM private key of the server")
    s.add_argument("--metrics-port", type=int, default=0, help="Prometheus /metrics; 0 = off")
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
        "host": args.host,
        "port": args.port,
        "auth_token": args.token,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "max_staleness": args.max_staleness,
        "keep_steps": args.keep_steps,
        "max_message_mb": args.max_message_mb,
    }
    cfg.buffer = replace(cfg.buffer, **{k: v for k, v in flags.items() if v is not None})
    return validate(cfg)


def main(args: argparse.Namespace) -> int:
    """Run ``buffer serve``; returns the exit status (2 for a bad setting)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = config_from_args(args)
    except ConfigError as exc:
        print(f"shuffle-r1 buffer serve: {exc}", file=sys.stderr)
        return 2
    buffer, embedded = start_embedded_redis(cfg.buffer)
    registry = CollectorRegistry()
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=buffer.host, registry=registry)
    try:
        server, port = serve(buffer, cfg.algorithm, registry=registry)
    except RuntimeError as exc:
        print(f"shuffle-r1 buffer serve: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"replay buffer listening on {buffer.host}:{port}", flush=True)
    if args.metrics_port:
        print(f"metrics on http://{buffer.host}:{args.metrics_port}/metrics", flush=True)
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
