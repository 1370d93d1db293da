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
