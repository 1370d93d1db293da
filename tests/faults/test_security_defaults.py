"""Security defaults (issue #8): the shared token (also from the environment), TLS on gRPC,
a Redis password and Redis TLS against a real redis-server, and no unpickling anywhere in
the code that reads Redis or the network. Loopback binding, mutual TLS and the port:
tests/security/test_buffer_security.py."""

from __future__ import annotations

import ast
import logging
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from buffer_helpers import ROOT, make_tls, random_groups
from grpc_health.v1 import health_pb2

from services.embedded_redis import PASSWORD_ENV, EmbeddedRedis, RedisTLS
from services.replay_buffer.client import TOKEN_ENV, ReplayBufferClient
from services.replay_buffer.server import BufferServer, serve
from shuffle_r1.config import AlgorithmConfig, BufferConfig, ConfigError, load_config

SERVING = health_pb2.HealthCheckResponse.SERVING
PASSWORD = "pw-\N{GREEK SMALL LETTER BETA}-8e3f1c"  # unusual, so a leak is easy to find


def test_shared_token(start_buffer, run_id):
    buffer = start_buffer(auth_token="s3cret")
    groups = random_groups(run_id, 0, 2)
    for token in ("", "wrong"):
        with ReplayBufferClient(buffer.address, token=token, retries=0) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.put_groups(groups)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer" in info.value.details()
            assert client.health() == SERVING  # health checks need no token
    assert buffer.metric("shuffle_r1_buffer_requests_total", method="PutGroups",
                         code="UNAUTHENTICATED") == 2  # fmt: skip
    assert buffer.client.put_groups(groups).stored == 2  # the fixture's client has the token
    assert buffer.client.sample(run_id, 0, policy_version=0).groups == 2


def test_token_from_the_environment_is_required_and_never_logged(
    start_buffer, run_id, monkeypatch, caplog
):
    secret = "env-token-5b1e0c"
    monkeypatch.setenv(TOKEN_ENV, secret)
    caplog.set_level(logging.DEBUG)
    buffer = start_buffer()  # buffer.auth_token is empty: the server takes $SHUFFLE_R1_BUFFER_TOKEN
    groups = random_groups(run_id, 0, 2)
    with pytest.raises(grpc.RpcError) as info:
        buffer.client.put_groups(groups)  # the fixture's client sends no token
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with ReplayBufferClient(buffer.address, retries=0) as client:  # token=None: the env's
        assert client.put_groups(groups).stored == 2
    assert buffer.metric("shuffle_r1_buffer_requests_total", method="PutGroups", code="OK") == 1
    assert "token=True" in caplog.text  # the server says a token is on ...
    assert secret not in caplog.text  # ... and never which


def test_grpc_tls(start_buffer, run_id, tmp_path):
    paths = make_tls(tmp_path)
    buffer = start_buffer(tls_cert=str(paths["cert"]), tls_key=str(paths["key"]))
    with ReplayBufferClient(buffer.address, root_cert=paths["ca"], retries=0) as client:
        assert client.put_groups(random_groups(run_id, 0, 2)).stored == 2
        assert client.sample(run_id, 0, policy_version=0).groups == 2
    for root in (paths["other"].read_bytes(), None):  # untrusted certificate; plaintext
        with ReplayBufferClient(buffer.address, root_cert=root, timeout_s=3, retries=0) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.stats(run_id)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def serve_on(url: str, **fields: str) -> tuple[BufferServer, ReplayBufferClient]:
    cfg = BufferConfig(redis_url=url, **fields)  # type: ignore[arg-type]
    server, port = serve(cfg, AlgorithmConfig())
    return server, ReplayBufferClient(f"127.0.0.1:{port}", token="", timeout_s=10, retries=0)


def put_and_sample(server: BufferServer, client: ReplayBufferClient) -> None:
    try:
        assert client.put_groups(random_groups("pw-run", 0, 2)).stored == 2
        assert client.sample("pw-run", 0, policy_version=0, expected_groups=2).groups == 2
        assert client.drop_run("pw-run").groups_deleted == 2
    finally:
        client.close()
        server.stop(0).wait()


def test_redis_password(monkeypatch, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    with EmbeddedRedis(password=PASSWORD) as private:
        bare = f"redis://127.0.0.1:{private.port}/0"
        wrong = f"redis://:not-{PASSWORD}@127.0.0.1:{private.port}/0"
        for url, says in ((bare, "refused to authenticate"), (wrong, "refused to authenticate")):
            with pytest.raises(RuntimeError) as info:
                serve_on(url)
            assert says in str(info.value) and PASSWORD_ENV in str(info.value)
            assert PASSWORD not in str(info.value)
        assert "redis://***@127.0.0.1" in str(info.value)  # the wrong URL, redacted

        put_and_sample(*serve_on(private.url))  # the password in the URL
        monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
        put_and_sample(*serve_on(bare))  # the password from the environment

        # the service's own process: a clear error, exit 1, the password not printed
        result = subprocess.run(
            [sys.executable, "-m", "services.replay_buffer.cli", "serve", "--redis-url", wrong],
            cwd=ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "refused to authenticate" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    assert PASSWORD not in caplog.text


def test_redis_tls(tmp_path):
    paths = {name: str(path) for name, path in make_tls(tmp_path).items()}
    server_tls = RedisTLS(ca_cert=paths["ca"], cert=paths["cert"], key=paths["key"])
    try:
        private = EmbeddedRedis(tls=server_tls, tls_auth_clients=True).start()
    except RuntimeError as exc:
        pytest.skip(f"this redis-server does not serve TLS: {exc}")
    try:
        assert private.url.startswith("rediss://127.0.0.1:")
        trusted = {"redis_tls_ca_cert": paths["ca"]}
        client_cert = {"redis_tls_cert": paths["client_cert"], "redis_tls_key": paths["client_key"]}
        put_and_sample(*serve_on(private.url, **trusted, **client_cert))
        refused = [
            ({"redis_tls_ca_cert": paths["other"], **client_cert}, "certificate verify failed"),
            # Redis asks for a client certificate and none is sent: it closes the connection
            # (EOF) or, if the client reads first, the TLS alert arrives
            (trusted, "EOF occurred|CERTIFICATE_REQUIRED"),
            (client_cert, "certificate verify failed"),  # the system CAs do not know ours
        ]
        for fields, says in refused:
            with pytest.raises(RuntimeError) as info:
                serve_on(private.url, **fields)
            message = str(info.value)
            assert f"cannot reach Redis at {private.url}" in message, message
            assert re.search(says, message) and "buffer.redis_tls_ca_cert" in message, message
        with pytest.raises(RuntimeError) as info:
            serve_on(private.url, redis_tls_ca_cert=str(tmp_path / "missing.pem"))
        assert f"buffer.redis_tls_ca_cert='{tmp_path}/missing.pem': no such file" in str(info.value)
        with pytest.raises(RuntimeError) as info:  # plaintext to the TLS port
            serve_on(private.url.replace("rediss://", "redis://"))
        assert "cannot reach Redis" in str(info.value)
    finally:
        private.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(["buffer.redis_tls_ca_cert=/ca.pem"], "must be a rediss:// URL"),
     (["buffer.redis_url=rediss://h:1/0", "buffer.redis_tls_cert=/c.pem"],
      "redis_tls_cert and buffer.redis_tls_key must be given together"),
     (["buffer.redis_url=http://:secret@h:1/0"], "got scheme 'http'"),
     (["buffer.host=''"], "buffer.host=''"),
     (["buffer.health_check_s=0"], "buffer.health_check_s=0.0 must be in (0.0, 60.0]")],
)  # fmt: skip
def test_bad_security_settings_fail_at_load(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)
    assert "secret" not in str(info.value)


# ---- nothing from Redis or the network is unpickled -------------------------------------

UNPICKLERS = {
    f"{module}.{fn}"
    for module in ("pickle", "_pickle", "cPickle", "cloudpickle", "dill", "marshal", "joblib")
    for fn in ("load", "loads", "Unpickler")
} | {"shelve.open", "pandas.read_pickle", "jsonpickle.decode", "ray.cloudpickle.loads"}


def unpickling_calls(source: str, filename: str) -> list[str]:
    """``file:line: call`` for each call in ``source`` that can unpickle: the functions of
    :data:`UNPICKLERS` (through any import alias), ``torch.load`` without
    ``weights_only=True`` and ``numpy.load`` with ``allow_pickle=True``."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                aliases[a.asname or a.name.split(".")[0]] = (
                    a.name if a.asname else a.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def dotted(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return aliases.get(expr.id, expr.id)
        if isinstance(expr, ast.Attribute):
            base = dotted(expr.value)
            return f"{base}.{expr.attr}" if base else None
        return None

    def keyword_is_true(call: ast.Call, name: str) -> bool:
        return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is True
                   for k in call.keywords)  # fmt: skip

    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        bad = (
            name in UNPICKLERS
            or (name == "torch.load" and not keyword_is_true(node, "weights_only"))
            or (name in ("numpy.load", "np.load") and keyword_is_true(node, "allow_pickle"))
        )
        if bad:
            found.append(f"{filename}:{node.lineno}: {name}")
    return found


def test_the_scanner_finds_every_kind_of_unpickling():
    source = """
import pickle, marshal as m, torch, numpy as np
from cloudpickle import loads as cl
from dill import load
pickle.loads(b"")
m.loads(b"")
cl(b"")
load(f)
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
torch.load("x.pt", weights_only=True)
np.load("x.npy", allow_pickle=True)
np.load("x.npy")
"""
    found = unpickling_calls(source, "example.py")
    assert [f.split(": ")[1] for f in found] == [
        "pickle.loads", "marshal.loads", "cloudpickle.loads", "dill.load", "torch.load",
        "torch.load", "numpy.load",
    ]  # fmt: skip
    assert found[0] == "example.py:5: pickle.loads"


def test_nothing_is_unpickled():
    files = [p for top in ("shuffle_r1", "actors", "services") for p in (ROOT / top).rglob("*.py")]
    assert len(files) > 20  # the scan looks at the code, not at an empty folder
    found = [hit for p in sorted(files)
             for hit in unpickling_calls(p.read_text(), str(p.relative_to(ROOT)))]  # fmt: skip
    assert not found, "calls that can unpickle untrusted bytes:\n" + "\n".join(found)


def test_embedded_redis_password_is_not_on_its_command_line(tmp_path):
    with EmbeddedRedis(password=PASSWORD) as private:
        assert private.process is not None
        cmdline = Path(f"/proc/{private.process.pid}/cmdline").read_bytes()
    assert PASSWORD.encode() not in cmdline


def test_cli_flags_reach_the_config():
    import argparse

    from services.replay_buffer.cli import add_parser, config_from_args

    root = argparse.ArgumentParser()
    add_parser(root.add_subparsers(dest="command"))
    flags = [
        "--redis-url",
        "rediss://h:1/0",
        "--redis-tls-ca-cert",
        "/ca.pem",
        "--redis-tls-cert",
        "/c.pem",
        "--redis-tls-key",
        "/k.pem",
        "--metrics-port",
        "91",
        "--tls-cert",
        "/s.pem",
        "--tls-key",
        "/sk.pem",
        "--tls-client-ca",
        "/cca.pem",
    ]
    buffer = config_from_args(root.parse_args(["buffer", "serve", *flags])).buffer
    assert buffer == replace(BufferConfig(), redis_url="rediss://h:1/0",
                             redis_tls_ca_cert="/ca.pem", redis_tls_cert="/c.pem",
                             redis_tls_key="/k.pem", metrics_port=91, tls_cert="/s.pem",
                             tls_key="/sk.pem", tls_client_ca="/cca.pem")  # fmt: skip
