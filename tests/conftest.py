"""Shared fixtures: one real local Ray for the whole session; a real Redis on loopback and
real replay buffer gRPC servers (tests/integration/buffer, tests/faults).

``redis_url`` is the Redis every test shares ($SHUFFLE_R1_REDIS_URL, else
redis://127.0.0.1:6379/0, else an embedded one for the session). Each test gets a unique
``run_id`` whose keys are deleted afterwards (found by SCAN, so a bug in DropRun cannot
leave them behind). Helpers the tests import are in ``tests/buffer_helpers.py``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import redis
    from prometheus_client import CollectorRegistry

    from services.replay_buffer.client import ReplayBufferClient
    from services.replay_buffer.server import BufferServer
    from shuffle_r1.config import AlgorithmConfig, BufferConfig

ROOT = Path(__file__).resolve().parents[1]


# ---- tests that time themselves run alone under `pytest -n` ------------------------------
# `make test` runs two test processes (pytest-xdist). A test marked ``serial`` (its assertions
# bound how long something takes) must not share the machine's two cores with the other
# process's test, so every test holds a lock while it runs: shared for ordinary tests,
# exclusive for serial ones. A turnstile in front of it keeps ordinary tests from starving a
# serial one: a serial test holds the turnstile while it waits, and no new test passes it.


def _locks_dir() -> Path | None:
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")  # set in every worker of one `pytest -n`
    if run is None:
        return None
    folder = Path(tempfile.gettempdir()) / f"shuffle-r1-tests-{run}"
    folder.mkdir(exist_ok=True)
    return folder


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    folder = _locks_dir()
    if folder is None:  # one process: nothing runs beside it
        yield
        return
    with (folder / "turnstile").open("a") as turnstile, (folder / "running").open("a") as running:
        if item.get_closest_marker("serial") is not None:
            fcntl.flock(turnstile, fcntl.LOCK_EX)  # no new test starts beside it
            fcntl.flock(running, fcntl.LOCK_EX)  # and the one running now ends first
        else:
            fcntl.flock(turnstile, fcntl.LOCK_SH)
            fcntl.flock(running, fcntl.LOCK_SH)
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:  # the running lock first: a test waiting at the turnstile holds neither
            fcntl.flock(running, fcntl.LOCK_UN)
            fcntl.flock(turnstile, fcntl.LOCK_UN)


def pytest_configure(config: pytest.Config) -> None:
    """Under ``pytest -n`` xdist keeps the order below (``--no-loadscope-reorder``), set here
    rather than in pyproject's addopts: a run without xdist (``-p no:xdist``) would refuse
    the option there."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Heaviest test files first, by ``tests/durations.json`` (seconds per file from a recent
    run, scripts/test_durations.py; a file not in it comes after, in the usual order). Under
    ``pytest -n`` xdist hands out whole files in this order (:func:`pytest_configure`): its
    own order, by number of tests, put the one-test end-to-end runs last, so one process ran
    a 3-minute run at the end while the other had nothing left."""
    weights = json.loads((ROOT / "tests" / "durations.json").read_text())
    items.sort(key=lambda item: -weights.get(item.nodeid.partition("::")[0], 0.0))  # stable


RAY_METRICS_PORT: list[int] = []  # the session Ray's metrics export port, once started


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray (4 logical CPUs, no dashboard) shared by every test that asks for it.

    ``RAY_AUTH_MODE=disabled``: Ray 2.60 turns token auth on by default. The repository root
    is on the workers' ``PYTHONPATH`` so actors can import test helper modules by path. Ray's
    metrics agent exports on a free port (:func:`ray_metrics_url`), reporting every second.
    """
    import ray

    from shuffle_r1.net import free_port

    os.environ["RAY_AUTH_MODE"] = "disabled"
    if not ray.is_initialized():
        RAY_METRICS_PORT.append(free_port())
        ray.init(
            address="local",  # never a cluster another test started with `ray start`
            num_cpus=4,
            include_dashboard=False,
            namespace="shuffle-r1-tests",
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}},
            logging_level=logging.WARNING,
            _metrics_export_port=RAY_METRICS_PORT[-1],
            _system_config={"metrics_report_interval_ms": 1000},
        )
    yield
    ray.shutdown()


@pytest.fixture
def ray_metrics_url(ray_cluster: None) -> str:
    """``http://127.0.0.1:<port>/metrics`` of the session Ray's metrics agent."""
    if not RAY_METRICS_PORT:
        pytest.skip("Ray was started outside the ray_cluster fixture: no metrics port known")
    return f"http://127.0.0.1:{RAY_METRICS_PORT[-1]}/metrics"


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen2.5-VL-architecture model with its processor, built once per
    session (small image bounds: 56x56 to 112x112 pixels)."""
    from shuffle_r1.models import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(
        tmp_path_factory.mktemp("models") / "tiny-vl", min_pixels=56 * 56, max_pixels=112 * 112
    )


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    from services.embedded_redis import EmbeddedRedis, ping

    url = os.environ.get("SHUFFLE_R1_REDIS_URL", "redis://127.0.0.1:6379/0")
    if ping(url):
        yield url
        return
    with EmbeddedRedis() as embedded:
        yield embedded.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    from services.embedded_redis import redis_client

    client = redis_client(redis_url)
    yield client
    client.close()


@pytest.fixture
def run_id(redis_client: redis.Redis) -> Iterator[str]:
    from buffer_helpers import run_keys

    run = f"test-{uuid.uuid4().hex[:12]}"
    yield run
    keys = run_keys(redis_client, run)
    if keys:
        redis_client.delete(*keys)


@dataclass
class Buffer:
    """A running server, a client of it and its metrics."""

    server: BufferServer
    port: int
    client: ReplayBufferClient
    registry: CollectorRegistry
    cfg: BufferConfig
    algo: AlgorithmConfig

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def start_buffer(redis_url: str) -> Iterator[Callable[..., Buffer]]:
    """``start_buffer(algo=AlgorithmConfig(...), token=..., **BufferConfig fields)``: an
    in-process server (on the shared Redis unless ``redis_url`` is given) and a client that
    sends ``token`` (default: the server's ``auth_token``), stopped after the test."""
    from prometheus_client import CollectorRegistry

    from services.replay_buffer.client import ReplayBufferClient
    from services.replay_buffer.server import serve
    from shuffle_r1.config import AlgorithmConfig, BufferConfig

    started: list[Buffer] = []

    def start(algo: AlgorithmConfig | None = None, token: str | None = None, **fields) -> Buffer:
        cfg = replace(BufferConfig(redis_url=redis_url, keep_steps=100), **fields)
        algo = algo or AlgorithmConfig()
        registry = CollectorRegistry()
        server, port = serve(cfg, algo, registry=registry)
        client = ReplayBufferClient(f"127.0.0.1:{port}", token=token or cfg.auth_token,
                                    timeout_s=10, retries=0)  # fmt: skip
        buffer = Buffer(server, port, client, registry, cfg, algo)
        started.append(buffer)
        return buffer

    yield start
    for buffer in started:
        buffer.client.close()
        buffer.server.stop(0).wait()


@pytest.fixture
def buffer(start_buffer: Callable[..., Buffer]) -> Buffer:
    """A server with the default algorithm (shuffle_r1, α = 0.5, S = 8), keep_steps=100."""
    return start_buffer()
