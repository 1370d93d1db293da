"""Per-step metrics of a run: a JSONL file, Prometheus gauges, and PNG plots at the end.

Every metric is a flat ``name -> float`` pair; Prometheus names are ``shuffle_r1_<name>``
with ``/`` and ``.`` turned into ``_``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Gauge, start_http_server

log = logging.getLogger(__name__)

PLOTTED = (
    ("reward/mean", "mean reward"),
    ("reward/accuracy", "train accuracy"),
    ("val/accuracy", "validation accuracy (mean pass@1)"),
    ("learner/policy_loss", "policy loss"),
    ("diag/silence_ratio", "rollout-silence ratio"),
    ("diag/collapse_share_before_pts", "advantage-collapse share (before PTS)"),
    ("time/step_s", "step time (s)"),
)


def prometheus_name(key: str) -> str:
    return "shuffle_r1_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


class MetricsWriter:
    """Appends one JSON object per step to ``path``; optionally serves Prometheus gauges.

    ``port > 0`` starts an HTTP exporter on ``host:port`` (loopback by default).
    """

    def __init__(self, path: Path, port: int = 0, host: str = "127.0.0.1") -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.registry = CollectorRegistry()
        self._gauges: dict[str, Gauge] = {}
        self.port = port
        if port:
            start_http_server(port, addr=host, registry=self.registry)
            log.info("Prometheus metrics on http://%s:%d/metrics", host, port)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if isinstance(value, float | int) and not isinstance(value, bool):
                gauge = self._gauges.get(key)
                if gauge is None:
                    gauge = Gauge(prometheus_name(key), key, registry=self.registry)
                    self._gauges[key] = gauge
                gauge.set(value)


def _plain(value: object) -> object:
    if hasattr(value, "item"):
        value = value.item()  # a 0-d tensor
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


def read_metrics(path: Path) -> list[dict[str, object]]:
    """The rows of a metrics JSONL file; the last row of a step wins (a resumed run rewrites)."""
    rows: dict[int, dict[str, object]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["step"])] = row
    return [rows[s] for s in sorted(rows)]


def plot_metrics(path: Path, out: Path) -> Path:
    """Draw the curves of :data:`PLOTTED` that the run has into one PNG; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    present = [(k, t) for k, t in PLOTTED if any(r.get(k) is not None for r in rows)]
    cols = 2
    nrows = max(1, math.ceil(len(present) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(10, 3 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, present, strict=False):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
