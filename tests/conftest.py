"""Shared fixtures: one real local Ray for the whole session, a real Redis on loopback."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


RAY_METRICS_PORT: list[int] = []  # the session Ray's metrics export port, once started


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray (4 logical CPUs, no dashboard) shared by every test that asks for it.

    ``RAY_AUTH_MODE=disabled``: Ray 2.60 turns token auth on by default. The repository root
    is on the workers' ``PYTHONPATH`` so actors can import test helper modules by path. Ray's
    metrics agent exports on a free port (:func:`ray_metrics_url`), reporting every second.
    """
    import ray

    from services.embedded_redis import free_port

    os.environ["RAY_AUTH_MODE"] = "disabled"
    if not ray.is_initialized():
        RAY_METRICS_PORT.append(free_port())
        ray.init(
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
