"""Ray metrics for the actors, built from the catalog (``shuffle_r1.metric_catalog``).

Inside a Ray actor, metrics go through ``ray.util.metrics``: each node's metrics agent exports
them on its metrics export port, with Ray's ``ray_`` prefix (the catalog explains how scrape
configs strip it). :func:`ray_metric` builds the metric a catalog entry describes, with its
kind, help text, label names and bucket edges, so an actor cannot export a name or label that
the dashboards do not know.
"""

from __future__ import annotations

from typing import Any

from ray.util import metrics as ray_metrics

from shuffle_r1.metric_catalog import BY_NAME, RAY_ROLES, SECONDS_BUCKETS


def ray_metric(name: str, buckets: tuple[float, ...] = SECONDS_BUCKETS) -> Any:
    """The Ray metric of catalog entry ``name`` (a ``Counter``, ``Gauge`` or ``Histogram``).

    ``buckets`` are the histogram's bucket edges (seconds by default). Raises ``KeyError`` for
    a name the catalog lacks and ``ValueError`` for a metric of a role that is not a Ray actor.
    """
    spec = BY_NAME[name]
    if spec.role not in RAY_ROLES:
        raise ValueError(f"{name} belongs to the {spec.role!r} role, which is not a Ray actor")
    tag_keys = spec.labels
    if spec.kind == "counter":
        return ray_metrics.Counter(name, spec.help, tag_keys=tag_keys)
    if spec.kind == "gauge":
        return ray_metrics.Gauge(name, spec.help, tag_keys=tag_keys)
    return ray_metrics.Histogram(name, spec.help, boundaries=list(buckets), tag_keys=tag_keys)
