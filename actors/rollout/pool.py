"""The rollout role (:class:`RolloutPool`): the Ray Serve application whose replicas are
:class:`~actors.rollout.worker.RolloutWorker` s; :func:`check_scale` and the deployment's
constants."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from actors.rollout.records import Completion, GenerationRequest, RolloutResult, SamplingSpec
from actors.rollout.worker import RolloutWorker
from shuffle_r1.config import RolloutConfig

logger = logging.getLogger(__name__)


ROLLOUT_DEPLOYMENT = "RolloutWorker"


class RolloutPool:
    """The rollout role: a Ray Serve application whose replicas are :class:`RolloutWorker` s,
    each with ``cfg.threads_per_worker`` CPUs, ``cfg.num_gpus_per_worker`` GPUs and
    ``cfg.ray_resources``.

    Scaling (``rollout.*``): without ``autoscaling`` the deployment runs ``num_workers``
    replicas and accepts external scaling within ``[min_workers, max_workers]``
    (:meth:`scale`, ``shuffle-r1 scale rollout N``); with it, Serve's autoscaler keeps
    between ``min_workers`` and ``max_workers`` replicas from the pending requests, a request
    being a chunk of about ``target_prompts_per_worker`` prompts. A replica serves one chunk at
    a time; Serve drains a replica it removes (up to ``drain_timeout_s``), so scaling down
    loses nothing; a replica that dies has its chunks re-sent.

    Weights: :meth:`generate` with ``weights=(version, ref)`` publishes them to the run's
    :class:`~actors.weights.WeightStore` and has every replica pull them before generating;
    a replica that joins later pulls the newest version before its first request.

    Call from one thread (the trainer's).
    """

    def __init__(
        self,
        cfg: RolloutConfig,
        model_path: str | Path,
        run_id: str,
        namespace: str,
        seed: int = 0,
        max_resends: int = 3,
    ) -> None:
        from ray import serve

        from actors.serving import HEALTH_CHECK_PERIOD_S, LOGGING, ensure_serve
        from actors.weights import ScalingInfo, weight_store, weight_store_name

        self.cfg = cfg
        self.app = f"{run_id}-rollout"
        self.max_resends = max_resends
        self.pending = 0  # prompts sent and not yet answered (the queue depth)
        self.last_sync_parts: dict[str, float] = {}  # seconds per part of the last sync
        ensure_serve(http_port=0)  # no-op when Serve runs (the trainer starts it first)
        self.store = weight_store(
            run_id,
            namespace,
            ScalingInfo(
                self.app, ROLLOUT_DEPLOYMENT, cfg.min_workers, cfg.max_workers, cfg.autoscaling
            ),
        )
        actor_options: dict[str, Any] = {
            "num_cpus": cfg.threads_per_worker,
            "num_gpus": cfg.num_gpus_per_worker,
        }
        if cfg.ray_resources:
            actor_options["resources"] = dict(cfg.ray_resources)
        options: dict[str, Any] = {
            "name": ROLLOUT_DEPLOYMENT,
            "ray_actor_options": actor_options,
            "max_ongoing_requests": 1,
            "health_check_period_s": HEALTH_CHECK_PERIOD_S,
            "graceful_shutdown_timeout_s": cfg.drain_timeout_s,
            "graceful_shutdown_wait_loop_s": 0.5,
        }
        if cfg.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": cfg.min_workers,
                "max_replicas": cfg.max_workers,
                "initial_replicas": cfg.num_workers,
                "target_ongoing_requests": 1,
                "upscale_delay_s": cfg.upscale_delay_s,
                "downscale_delay_s": cfg.downscale_delay_s,
                "look_back_period_s": cfg.autoscale_look_back_s,
            }
        else:
            options["num_replicas"] = cfg.num_workers
        started = time.perf_counter()
        deployment = serve.deployment(**options)(RolloutWorker)
        self.handle = serve.run(
            deployment.bind(
                str(model_path), cfg, seed, weight_store_name(run_id), namespace, run_id
            ),
            name=self.app,
            route_prefix=None,
            external_scaler_enabled=not cfg.autoscaling,
            logging_config=LOGGING,
        )
        logger.info(
            "rollout: %d %s workers of %s ready in %.1f s",
            cfg.num_workers,
            cfg.engine,
            model_path,
            time.perf_counter() - started,
        )

    @property
    def num_workers(self) -> int:
        """Replicas running now."""
        from actors.serving import running_replicas

        return running_replicas(self.app, ROLLOUT_DEPLOYMENT)

    def wait_for_workers(self, num_workers: int, timeout_s: float = 300.0) -> None:
        """Block until exactly ``num_workers`` replicas run and answer (``TimeoutError``)."""
        from actors.serving import wait_for_replicas

        wait_for_replicas(self.app, ROLLOUT_DEPLOYMENT, num_workers, timeout_s, self.handle)

    def scale(self, num_workers: int) -> None:
        """Ask Serve for ``num_workers`` replicas (returns at once; replicas start or drain
        asynchronously). Raises ``ValueError`` outside ``[min_workers, max_workers]`` or
        when the deployment autoscales."""
        from actors.serving import set_num_replicas

        check_scale(num_workers, self.cfg.min_workers, self.cfg.max_workers, self.cfg.autoscaling)
        set_num_replicas(self.app, ROLLOUT_DEPLOYMENT, num_workers)

    def sync(self, weights: tuple[int, ray.ObjectRef]) -> float:
        """Publish ``weights = (version, ref)`` and have every running replica load them;
        returns the wall seconds (0.0 when every replica already held them). The slowest
        replica's seconds per part are in ``last_sync_parts``
        (:meth:`RolloutWorker.sync_weights`)."""
        version, ref = weights
        ray.get(self.store.publish.remote(version, [ref]))
        start = time.perf_counter()
        replies = self.handle.broadcast("sync_weights", version).results()
        seconds = time.perf_counter() - start
        # the slowest replica's seconds per part (RolloutWorker.sync_weights)
        keys = {k for reply in replies for k in reply["parts"]}
        self.last_sync_parts = {k: max(r["parts"].get(k, 0.0) for r in replies) for k in keys}
        return seconds if any(r["load_s"] > 0 for r in replies) else 0.0

    def workers(self) -> list[dict[str, Any]]:
        """:meth:`RolloutWorker.ping` of every running replica."""
        return list(self.handle.broadcast("ping").results())

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: SamplingSpec,
        weights: tuple[int, ray.ObjectRef] | None = None,
    ) -> RolloutResult:
        """Generate ``sampling.n`` completions for every request.

        ``weights = (version, ref)``: published first (:meth:`sync`), and every request asks
        for at least that version. The requests go out as contiguous chunks: one per running
        replica, or more when the pool autoscales or the step has more than
        ``target_prompts_per_worker`` prompts per replica. Chunks whose replica died are
        re-sent (``max_resends`` rounds, then ``RuntimeError``); errors raised inside an
        engine propagate. Raises ``ValueError`` on duplicate request ids.
        """
        from actors.serving import dispatch, split

        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request_id must be unique within a generate call")
        sync_s = self.sync(weights) if weights is not None else 0.0
        min_version = weights[0] if weights is not None else 0
        live = max(self.num_workers, 1)
        parts = max(live, math.ceil(len(requests) / self.cfg.target_prompts_per_worker))
        chunks = split(list(requests), min(parts, max(len(requests), 1)))
        start = time.perf_counter()
        sent = dispatch(
            lambda chunk: self.handle.generate.remote(chunk, sampling, min_version),
            chunks,
            self.max_resends,
            "rollout",
            progress=self._set_pending,
        )
        generate_s = time.perf_counter() - start
        by_request: dict[str, list[Completion]] = {}
        served: dict[str, int] = {}
        for chunk, reply in zip(chunks, sent.results, strict=True):
            if not chunk:
                continue
            served[reply.worker] = served.get(reply.worker, 0) + len(chunk)
            for c in reply.completions:
                by_request.setdefault(c.request_id, []).append(c)
        completions = []
        for request in requests:
            group = sorted(by_request.get(request.request_id, []), key=lambda c: c.index)
            if [c.index for c in group] != list(range(sampling.n)):
                raise RuntimeError(
                    f"request {request.request_id!r} came back with {len(group)} completions; "
                    f"expected indices 0..{sampling.n - 1}"
                )
            completions += group
        tokens = sum(len(c.token_ids) for c in completions)
        engine_s = max((reply.engine_s for reply in sent.results if reply is not None), default=0.0)
        return RolloutResult(
            completions, generate_s, sync_s, tokens, sent.resent_items, served, engine_s
        )

    def _set_pending(self, prompts: int) -> None:
        self.pending = prompts

    def shutdown(self) -> None:
        """Delete the Serve application (its replicas and their engines) and the weight store."""
        from ray import serve

        serve.delete(self.app)
        ray.kill(self.store, no_restart=True)


def check_scale(num_workers: int, min_workers: int, max_workers: int, autoscaling: bool) -> None:
    """Raise ``ValueError`` unless ``num_workers`` rollout workers may be asked for by hand."""
    if autoscaling:
        raise ValueError(
            "the rollout deployment autoscales (rollout.autoscaling=true): Serve sets its size "
            f"between {min_workers} and {max_workers}; run with rollout.autoscaling=false to "
            "scale by hand"
        )
    if not min_workers <= num_workers <= max_workers:
        raise ValueError(
            f"{num_workers} rollout workers is outside [rollout.min_workers={min_workers}, "
            f"rollout.max_workers={max_workers}]"
        )
