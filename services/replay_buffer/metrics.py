"""The replay buffer server's Prometheus metrics (catalog: :mod:`shuffle_r1.metric_catalog`)."""

from __future__ import annotations

from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protos import replay_buffer_pb2 as pb
from services.replay_buffer.store import Held
from shuffle_r1.metric_catalog import BY_NAME

_METHODS = tuple(m.name for m in pb.DESCRIPTOR.services_by_name["ReplayBuffer"].methods)
_C = TypeVar("_C", Counter, Gauge, Histogram)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class BufferMetrics:
    """Prometheus metrics of one server, in their own registry: the ``role == "buffer"``
    entries of :mod:`shuffle_r1.metric_catalog`, with the catalog's names, kinds, labels and
    help texts (request latency with sub-millisecond buckets)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = self._counter("requests_total")  # method, code
        self.latency = self._metric(Histogram, "request_seconds", buckets=_LATENCY_BUCKETS)
        self.groups = self._counter("groups_put_total")  # outcome
        self.pairs_kept = self._counter("pairs_kept_total")
        self.pairs_dropped = self._counter("pairs_dropped_total")
        self.stale = self._counter("stale_dropped_total")  # where: put | sample
        self.evicted_steps = self._counter("evicted_steps_total")
        self.evicted_groups = self._counter("evicted_groups_total")
        self.samples = self._counter("samples_total")
        self.items = self._counter("items_sampled_total")
        self.shortfall = self._counter("abs_shortfall_total")
        self.skipped = self._counter("skipped_batches_total")
        self.redis_errors = self._counter("redis_errors_total")  # op: an RPC or "health"
        self.groups_stored = self._gauge("groups_stored")  # run
        self.rollouts_stored = self._gauge("rollouts_stored")  # run
        self.silence = self._gauge("rollout_silence_ratio")
        self.collapse = self._gauge("advantage_collapse_share")
        # Known label values start at 0, so a scrape shows them before the first event.
        for op in (*_METHODS, "health"):
            self.redis_errors.labels(op)
        for outcome in ("stored", "duplicate", "stale", "evicted"):
            self.groups.labels(outcome)
        for where in ("put", "sample"):
            self.stale.labels(where)

    def _metric(self, kind: type[_C], short: str, **options: Any) -> _C:
        spec = BY_NAME["shuffle_r1_buffer_" + short]
        return kind(spec.name, spec.help, spec.labels, registry=self.registry, **options)

    def _counter(self, short: str) -> Counter:
        return self._metric(Counter, short)

    def _gauge(self, short: str) -> Gauge:
        return self._metric(Gauge, short)

    def set_held(self, run_id: str, held: Held) -> None:
        """Set the stored-size gauges of ``run_id`` from what the store reported."""
        self.groups_stored.labels(run_id).set(held.groups)
        self.rollouts_stored.labels(run_id).set(held.rollouts)

    def forget_run(self, run_id: str) -> None:
        """Remove the stored-size series of a dropped run."""
        self.groups_stored.remove(run_id)
        self.rollouts_stored.remove(run_id)
