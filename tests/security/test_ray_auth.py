"""A local Ray started by a run refuses other hosts by default (issue #20, finding 1).

Ray 2.60 binds its GCS, raylet and workers on every interface, whatever node address it is
given (measured), so before this change anyone who could reach the machine could connect
and run code as the training user. A run now starts its local Ray in token mode by default.
This test starts one as ``shuffle-r1 train`` does (``init_ray`` with the default config) and
connects to it from this machine's non-loopback address: without the token the connection
is refused; with it a task runs, so the refusal is authentication, not the network."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from buffer_helpers import outward_ip

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

HEAD = """
import sys
from shuffle_r1.config import load_config
from services.trainer.bootstrap import init_ray
init_ray(load_config(None, ["cluster.num_cpus=1", "cluster.namespace=security"]))
import ray
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the test closes it
"""

CLIENT = """
import sys
import ray
try:
    ray.init(address=sys.argv[1], logging_level="ERROR")
    print("RAN", ray.get(ray.remote(lambda: 42).remote(), timeout=60), flush=True)
except Exception as exc:
    print("REFUSED", type(exc).__name__, str(exc)[:300], flush=True)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return {**env, **extra}


def _client_env(**extra: str) -> dict[str, str]:
    # a refused client retries for up to a minute by default; the refusal comes at once
    return _env(RAY_py_gcs_connect_timeout_s="3", RAY_gcs_rpc_server_connect_timeout_s="3",
                RAY_gcs_rpc_server_reconnect_timeout_s="3", **extra)  # fmt: skip


def _connect(address: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", CLIENT, address], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=180, check=False)  # fmt: skip
    return done.stdout.strip() or done.stderr[-500:]


def test_local_ray_refuses_a_remote_client_without_the_token() -> None:
    ip = outward_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    token = secrets.token_hex(32)
    # the run's environment: no RAY_AUTH_MODE, so the config's default decides
    head = subprocess.Popen([sys.executable, "-c", HEAD], cwd=ROOT, env=_env(RAY_AUTH_TOKEN=token),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert head.stdout is not None
        gcs = head.stdout.readline().strip()
        assert gcs, "the head did not start"
        remote = f"{ip}:{gcs.rsplit(':', 1)[1]}"
        stranger = _connect(remote, _client_env(RAY_AUTH_MODE="disabled"))
        assert stranger.startswith("REFUSED"), stranger
        member = _connect(remote, _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token))
        assert member == "RAN 42", member
    finally:
        if head.stdin is not None:
            head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
