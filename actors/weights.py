"""The weight store: where rollout workers find the newest policy weights (docs/architecture.md).

One named Ray actor per run holds ``(weight version, object ref)`` of the newest weights the
learner published. Rollout workers pull from it: a joining worker loads the newest version
before its first request, and a running one whenever a request or a sync asks for a version it
does not hold. The weights themselves stay in the object store (one ``ray.put`` by learner rank
0, read by every worker); the store only passes the reference on.

It also keeps the run's **generation ledger**: every rollout worker reports the request ids it
completed, so "every prompt of every step generated exactly once" can be checked on what the
workers did, not only on what the trainer kept; and the rollout deployment's scaling bounds,
which ``shuffle-r1 scale rollout N`` checks against.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import ray


@dataclass(frozen=True)
class ScalingInfo:
    """How the run's rollout deployment may be scaled.

    Attributes:
        app: the Serve application; deployment: its rollout deployment.
        min_workers, max_workers: the bounds of ``rollout.*_workers``.
        autoscaling: Serve autoscales it (then it cannot be scaled by hand).
    """

    app: str
    deployment: str
    min_workers: int
    max_workers: int
    autoscaling: bool


class WeightStore:
    """Holds the newest published weights of one run and its generation ledger (a Ray actor;
    :func:`weight_store` creates or finds it by name)."""

    def __init__(self, scaling: ScalingInfo) -> None:
        self._version = 0
        self._refs: list[ray.ObjectRef] = []
        self._scaling = scaling
        self._generated: Counter[str] = Counter()
        self._served: dict[str, dict[str, Any]] = {}

    def publish(self, version: int, refs: list[ray.ObjectRef]) -> None:
        """Make ``refs[0]`` (a state dict in the object store, passed inside a list so Ray
        does not resolve it) the weights of ``version``. An older version is ignored.

        Raises:
            ValueError: ``refs`` does not hold exactly one reference.
        """
        if len(refs) != 1:
            raise ValueError(f"publish() takes [ref], got {len(refs)} references")
        if version >= self._version:
            self._version, self._refs = version, list(refs)

    def latest(self) -> tuple[int, list[ray.ObjectRef]]:
        """``(version, [ref])``; ``(0, [])`` before anything was published (version 0 is the
        model folder every worker loads at start)."""
        return self._version, list(self._refs)

    def version(self) -> int:
        return self._version

    def record(self, worker: str, weight_version: int, request_ids: list[str]) -> None:
        """A worker completed ``request_ids`` with weights ``weight_version``."""
        self._generated.update(request_ids)
        entry = self._served.setdefault(worker, {"requests": 0, "weight_version": 0})
        entry["requests"] += len(request_ids)
        entry["weight_version"] = weight_version

    def generated(self, prefix: str = "") -> dict[str, int]:
        """How many times each request id starting with ``prefix`` was generated."""
        return {k: v for k, v in self._generated.items() if k.startswith(prefix)}

    def forget(self, prefix: str) -> int:
        """Drop ledger entries starting with ``prefix`` (a finished step); returns how many."""
        keys = [k for k in self._generated if k.startswith(prefix)]
        for k in keys:
            del self._generated[k]
        return len(keys)

    def served(self) -> dict[str, dict[str, Any]]:
        """Per worker id: requests completed and the weight version of its last request."""
        return {k: dict(v) for k, v in self._served.items()}

    def scaling(self) -> dict[str, Any]:
        return asdict(self._scaling)


def weight_store_name(run_id: str) -> str:
    return f"{run_id}-weights"


def weight_store(run_id: str, namespace: str, scaling: ScalingInfo) -> Any:
    """Create the run's :class:`WeightStore` actor, or return the live one of that name.

    The actor holds no state that cannot be rebuilt: if it dies, Ray restarts it empty and
    the next publish fills it again (``max_restarts=-1``).
    """
    return (
        ray.remote(WeightStore)
        .options(  # type: ignore[attr-defined]
            name=weight_store_name(run_id),
            namespace=namespace,
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=-1,
            lifetime=None,
        )
        .remote(scaling)
    )
