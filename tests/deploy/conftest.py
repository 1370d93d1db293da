"""Fixtures of the deployment tests: the chart rendered once per values file in ``ci/``."""

from __future__ import annotations

from pathlib import Path

import pytest
from k8s_offline import CHART, Render, render_chart

VALUES_FILES = sorted((CHART / "ci").glob("*-values.yaml"))


@pytest.fixture(
    params=VALUES_FILES, ids=[p.name.removesuffix("-values.yaml") for p in VALUES_FILES]
)
def values_file(request: pytest.FixtureRequest) -> Path:
    return Path(request.param)


@pytest.fixture
def rendered(values_file: Path) -> Render:
    """The chart rendered with ``values_file`` (cached: rendered once per file per session)."""
    return render_chart(values_file.read_text())
