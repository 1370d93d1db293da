"""The rollout worker (:class:`RolloutWorker`): one engine, as a replica of the rollout Ray
Serve deployment (:mod:`actors.rollout.pool`)."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import ray
from torch import Tensor

from actors.metrics import ray_metric
from actors.rollout.engines import make_engine
from actors.rollout.records import GenerateReply, GenerationRequest, SamplingSpec, request_seed
from actors.serving import worker_id
from shuffle_r1.config import RolloutConfig

T = TypeVar("T")


class RolloutWorker:
    """One engine, as a replica of the rollout Serve deployment (:class:`RolloutPool`) or as a
    plain Ray actor (``ray.remote(RolloutWorker)``, in tests).

    ``weight_store`` is the name of the run's :class:`~actors.weights.WeightStore` (in
    ``namespace``; the worker's metrics carry ``run_id``): the worker loads the newest
    published weights before it serves its first request, and again whenever a call asks for
    a version it does not hold. Without a store the worker only loads what
    :meth:`load_weights` hands it. One engine call runs at a time (generation and weight
    loads are serialised: every engine call goes through the engine's one thread); Serve's
    event loop stays free for health checks because the engine runs in that thread.

    That thread is one and the same for the engine's whole life (built, warmed up, loading
    weights, generating): torch's OpenMP runtime gives every thread that runs a parallel
    region its own team of worker threads, and vLLM binds the team of the thread that built
    the engine. Calls spread over a thread pool (``asyncio.to_thread``) made extra teams,
    more OpenMP threads than cores, so their workers slept between regions instead of
    spinning: the engine ran 12-19 % slower in a replica than in a plain process on the
    same requests (README "Rollout overhead").
    """

    def __init__(
        self,
        model_path: str | Path,
        cfg: RolloutConfig,
        seed: int = 0,
        weight_store: str | None = None,
        namespace: str | None = None,
        run_id: str = "",
    ) -> None:
        self.worker_id = worker_id()
        self._engine_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        # replicas get the same arguments: mix the worker id into the engine's own RNG seed,
        # which only unseeded requests use
        engine_seed = seed ^ (request_seed(0, self.worker_id) >> 32)
        self.engine = self._on_engine_thread(make_engine, model_path, cfg, engine_seed)
        # seconds per part of the last weight sync (store, fetch, load, the engine's parts)
        self.last_sync_parts: dict[str, float] = {}
        self._store: Any = (
            ray.get_actor(weight_store, namespace=namespace) if weight_store else None
        )
        tags = {"worker": self.worker_id, "run": run_id}
        self._m_requests = ray_metric("shuffle_r1_rollout_worker_requests_total")
        self._m_tokens = ray_metric("shuffle_r1_rollout_worker_tokens_total")
        self._m_generate = ray_metric("shuffle_r1_rollout_worker_generate_seconds")
        self._m_version = ray_metric("shuffle_r1_rollout_worker_weight_version")
        self._m_load = ray_metric("shuffle_r1_rollout_worker_weight_load_seconds")
        for metric in (
            self._m_requests,
            self._m_tokens,
            self._m_generate,
            self._m_version,
            self._m_load,
        ):
            metric.set_default_tags(tags)
        self._m_version.set(0)
        if self._store is not None:
            newest: Any = ray.get(self._store.version.remote())
            self._on_engine_thread(self._sync, newest)

    # -- the engine, on its one thread -------------------------------------------------------

    def _on_engine_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the engine's thread, waited for (from a thread that may block)."""
        return self._engine_thread.submit(fn, *args).result()

    async def _on_engine_thread_async(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the engine's thread, awaited (Serve's event loop stays free)."""
        return await asyncio.get_running_loop().run_in_executor(self._engine_thread, fn, *args)

    def _sync(self, min_version: int) -> float:
        """Load the store's newest weights if this worker is below ``min_version``; seconds."""
        if self._store is None or self.engine.weight_version >= min_version:
            return 0.0
        start = time.perf_counter()
        latest: tuple[int, list[ray.ObjectRef]] = ray.get(self._store.latest.remote())
        version, refs = latest
        if version < min_version:
            raise RuntimeError(
                f"rollout worker {self.worker_id}: asked for weight version >= {min_version} "
                f"but the weight store holds {version}; publish before generating"
            )
        asked = time.perf_counter()
        state = ray.get(refs[0])
        fetched = time.perf_counter()
        load_s = self._load(version, state)
        self.last_sync_parts = {
            "store": asked - start,
            "fetch": fetched - asked,
            "load": load_s,
            **self.engine.last_load_parts,
        }
        return time.perf_counter() - start

    def _load(self, version: int, state_dict: dict[str, Tensor]) -> float:
        start = time.perf_counter()
        self.engine.load_weights(version, state_dict)
        seconds = time.perf_counter() - start
        self._m_load.observe(seconds)
        self._m_version.set(version)
        return seconds

    def _generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingSpec, min_version: int
    ) -> GenerateReply:
        self._sync(min_version)
        start = time.perf_counter()
        completions = self.engine.generate(requests, sampling)
        seconds = time.perf_counter() - start
        version = self.engine.weight_version
        self._m_generate.observe(seconds)
        self._m_requests.inc(len(requests))
        self._m_tokens.inc(sum(len(c.token_ids) for c in completions))
        if self._store is not None:
            self._store.record.remote(self.worker_id, version, [r.request_id for r in requests])
        return GenerateReply(self.worker_id, completions, seconds)

    # -- the calls -----------------------------------------------------------------------------

    async def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: SamplingSpec,
        min_version: int = 0,
    ) -> GenerateReply:
        """``sampling.n`` completions per request (flat, request order then index), after
        loading weights of at least ``min_version`` from the store if this worker is behind."""
        return await self._on_engine_thread_async(self._generate, requests, sampling, min_version)

    async def sync_weights(self, min_version: int) -> dict[str, Any]:
        """Pull the store's newest weights if below ``min_version``; returns :meth:`ping`
        with the seconds the sync took (``load_s``, 0.0 when already there) and its
        ``parts`` (seconds: ``store``, ``fetch``, ``load`` and the engine's own parts)."""
        seconds = await self._on_engine_thread_async(self._sync, min_version)
        parts = self.last_sync_parts if seconds > 0 else {}
        return {**self.ping(), "load_s": seconds, "parts": parts}

    def load_weights(self, version: int, state: dict[str, Tensor] | ray.ObjectRef) -> float:
        """Load ``state`` (a state dict, or an object ref to one) as ``version``; return the
        seconds it took. A ref passed as a top-level argument arrives already resolved."""
        state_dict = ray.get(state) if isinstance(state, ray.ObjectRef) else state
        return self._on_engine_thread(self._load, version, state_dict)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def ping(self) -> dict[str, Any]:
        """``{"worker", "engine", "weight_version", "pid"}``: alive, and which engine serves."""
        return {
            "worker": self.worker_id,
            "engine": self.engine.name,
            "weight_version": self.engine.weight_version,
            "pid": os.getpid(),
        }
