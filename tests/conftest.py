"""Shared fixtures: one real local Ray for the whole session, a real Redis on loopback."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray (4 logical CPUs, no dashboard) shared by every test that asks for it.

    ``RAY_AUTH_MODE=disabled``: Ray 2.60 turns token auth on by default. The repository root
    is on the workers' ``PYTHONPATH`` so actors can import test helper modules by path.
    """
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            namespace="shuffle-r1-tests",
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"}},
            logging_level=logging.WARNING,
        )
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen2.5-VL-architecture model with its processor, built once per
    session (small image bounds: 56x56 to 112x112 pixels)."""
    from shuffle_r1.models import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(
        tmp_path_factory.mktemp("models") / "tiny-vl", min_pixels=56 * 56, max_pixels=112 * 112
    )
