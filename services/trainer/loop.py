"""The trainer: the single controller of every role in a training step (docs/architecture.md).

One step:

1. the data sampler draws ``trainer.rollout_batch_size`` prompts;
2. the rollout pool generates ``rollout.n`` rollouts per prompt, first syncing every worker
   to the newest weight version;
3. the reward pool scores them (docs/algorithm.md §6);
4. the groups go to the replay buffer service over gRPC, which computes GRPO advantages
   and runs PTS (§1, §2); the trainer then samples the step's ABS batch (§3);
5. the learner group recomputes old-policy log-probs on that batch and updates the policy
   (§3.4, §4), then publishes the new weights once into the object store. When the update
   is a single optimizer step (one mini-batch, one PPO epoch) the old log-probs come from
   the update's own forward pass instead: the same weights, one forward pass fewer.

``trainer.mode=async`` runs steps 1–3 in a producer thread (``services.trainer.producer``)
up to ``buffer.max_staleness`` steps ahead of steps 4–5, and the learner corrects for the
older behaviour policy (docs/algorithm.md §4, "Stale rollouts").

Metrics go to ``<output_dir>/metrics.jsonl``, to the experiment trackers that
``trainer.loggers`` names (``services.trainer.trackers``) and to Prometheus when
``trainer.metrics_port`` is set; a checkpoint every ``trainer.save_every`` steps lets
``--resume`` continue with the same data order; evaluation on the held-out split every
``trainer.eval_every`` steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from tqdm import tqdm

from actors.learner import LearnerFailedError, LearnerGroup
from actors.reward import RewardPool, ScoreRequest
from actors.rollout import GenerationRequest, RolloutPool, SamplingSpec
from actors.serving import ensure_serve
from protos import replay_buffer_pb2 as pb
from services.replay_buffer.actor import start_replay_buffer_actor
from services.replay_buffer.client import ReplayBufferClient
from services.replay_buffer.session import BufferSession, connect_buffer
from services.trainer.bootstrap import init_ray, redis_for_run, resolve_precision, vocab_size
from services.trainer.metrics import (
    MetricsWriter,
    TrainerExporter,
    held_out_summary,
    plot_metrics,
    read_metrics,
    step_metrics,
)
from services.trainer.producer import RolloutProducer
from services.trainer.records import step_groups, train_batch
from services.trainer.runlock import RunLock
from services.trainer.state import (
    TrainerState,
    checkpoint_dir,
    files_under,
    latest_checkpoint,
    prune_checkpoints,
    read_manifest,
    read_state,
    run_key,
    saving_checkpoint,
    write_state,
)
from services.trainer.trackers import Trackers, open_trackers
from shuffle_r1.config import Config, save_config
from shuffle_r1.data import PromptSampler
from shuffle_r1.data.splits import Prompt, load_prompt_splits
from shuffle_r1.minibatches import abs_minibatch_rows, minibatch_pair_stats
from shuffle_r1.models import is_vision_language, resolve_model_path
from shuffle_r1.precision import cpu_description

logger = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2


@dataclass
class StepRollouts:
    """One step's scored rollouts, grouped for the buffer: what the rollout side hands the
    learner (in ``trainer.mode=async`` across threads).

    Attributes:
        step: the training step (0-based) they are for.
        prompts: the step's prompts, in draw order.
        gen: the rollout pool's result (completions in prompt order, n per prompt).
        scores: one reward score per completion.
        groups: the buffer's ``Group`` per prompt.
        put: the buffer's ``PutGroupsResponse`` when the producer already put them, else None.
        times: seconds per phase (``generate``, ``rollout_sync``, ``generate_engine``,
            ``reward``, ``buffer_put``).
    """

    step: int
    prompts: list[Prompt]
    gen: Any
    scores: list[Any]
    groups: list[Any]
    put: Any
    times: dict[str, float]


@dataclass(frozen=True)
class RunSummary:
    """What a run wrote and how it went. ``held_out`` is :func:`held_out_summary` of its
    ``metrics.jsonl`` (``None`` without evaluations); ``path`` the JSON copy of it all."""

    steps: int
    output_dir: Path
    metrics_path: Path
    plot_path: Path | None
    checkpoint: Path | None
    wall_s: float  # from the start of the Trainer's setup (Ray, engines, learner) to the end
    train_s: float  # the step loop and its evaluations
    last_metrics: dict[str, Any]
    held_out: dict[str, Any] | None
    path: Path


class Trainer:
    """Builds every role for ``cfg`` and runs the step loop; see the module doc.

    ``resume=True`` continues from the newest complete checkpoint in
    ``trainer.output_dir`` (model, optimizer, sampler position, RNG, weight version).
    Call :meth:`close` (or use as a context manager) to stop the roles.
    """

    def __init__(self, cfg: Config, resume: bool = False) -> None:
        self.created = time.perf_counter()  # setup counts in the run's wall time
        cfg, self.precision = resolve_precision(cfg)
        self.cfg = cfg
        self.out = Path(cfg.trainer.output_dir)
        # one run per folder, before anything in it is touched (RunLockedError otherwise)
        self.lock = RunLock(self.out).acquire()
        self.cpu = cpu_description()
        said = ", ".join(f"{role} {c.dtype} ({c.reason})" for role, c in self.precision.items())
        self.precision_text = ", ".join(f"{r} {c.dtype}" for r, c in self.precision.items())
        logger.info("precision: %s; processor: %s", said, self.cpu)
        save_config(cfg, self.out / "config.yaml", f"precision: {said}\nprocessor: {self.cpu}")
        self.run_id = cfg.trainer.run_name
        self.resumed = resume
        self.trackers: Trackers | None = None  # opened by run()
        self.state = TrainerState()
        self.counters: dict[str, float] = {}
        self.last_prompt_ids: list[str] = []
        torch.manual_seed(cfg.trainer.seed)
        self.asynchronous = cfg.trainer.mode == "async"
        self.producer: RolloutProducer[StepRollouts] | None = None  # async: started by run()
        # the sampler's state before it drew each step still to train (a checkpoint at step
        # s saves the one before s: in async mode the producer has drawn further)
        self._sampler_before: dict[int, dict[str, Any]] = {}
        self._drawing = threading.Lock()  # a draw and its snapshot, against save()
        self._pools = threading.Lock()  # one generate + score at a time (producer, evaluate)
        self._producer_idle_s = 0.0  # the producer's idle seconds at the last step recorded
        self._stop = threading.Event()  # set by stop(): the step that sees it is the last

        init_ray(cfg)
        self.model_path = resolve_model_path(cfg.learner.model_path)
        # The learner ranks start (import torch, load and shard the model) while this thread
        # loads the data and starts the buffer, Serve and the rollout and reward pools: the
        # roles' start-ups overlap instead of adding up (docs/architecture.md §1).
        starting = ThreadPoolExecutor(1, thread_name_prefix="learner-start")
        learner = starting.submit(LearnerGroup, cfg, self.model_path)
        try:
            self._start_roles(cfg)
            self.learner = learner.result()
        except BaseException:
            _discard_learner(learner)
            raise
        finally:
            starting.shutdown(wait=False)
        self.metrics_path = self.out / "metrics.jsonl"
        self.prompts_path = self.out / "prompts.jsonl"  # the prompt ids each step drew
        if resume:
            self._resume()
        else:
            self.session.drop_run()
            self.metrics_path.unlink(missing_ok=True)
            self.prompts_path.unlink(missing_ok=True)
        self.metrics = MetricsWriter(self.metrics_path)
        self.exporter = TrainerExporter(cfg.trainer.metrics_port, cfg.trainer.metrics_host)
        self.exporter.set_live_workers("rollout", lambda: self.rollout.num_workers)
        self.exporter.set_live_workers("reward", lambda: self.reward.num_workers)
        self.exporter.set_live_workers("learner", lambda: len(self.learner.workers))
        self.exporter.track_queue_depth(lambda: self.rollout.pending)
        for kind in ("skipped_rows", "overlong_prompts"):
            self.exporter.count_error("data", kind, self.counters.get(f"data/{kind}", 0))

    def _start_roles(self, cfg: Config) -> None:
        """Everything but the learner: Redis, the buffer actor, the tokenizer and data, Serve,
        the rollout and reward pools, then the buffer session (its first connection waits for
        the buffer actor, which has been starting meanwhile)."""
        redis_url, self._redis = redis_for_run(cfg.buffer, self.out / "redis")
        self.buffer_actor = start_replay_buffer_actor(  # returns at once; it starts meanwhile
            dataclasses.replace(cfg.buffer, redis_url=redis_url), cfg.algorithm
        )
        self.processor: Any = None  # a vision-language model's (shuffle_r1.processor)
        if is_vision_language(self.model_path):
            from shuffle_r1.processor import load_processor

            self.processor = load_processor(self.model_path)
            self.tokenizer = self.processor.tokenizer
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.train_prompts, self.val_prompts = self._load_data()
        self.sampler = PromptSampler(
            len(self.train_prompts),
            cfg.trainer.rollout_batch_size,
            seed=cfg.data.seed,
            shuffle=cfg.data.shuffle,
        )
        ensure_serve(cfg.reward.http_host, cfg.reward.http_port)
        self.rollout = RolloutPool(
            cfg.rollout,
            self.model_path,
            self.run_id,
            cfg.cluster.namespace,
            seed=cfg.trainer.seed,
        )
        self.reward = RewardPool(cfg.reward, self.run_id)
        self.spec = pb.RunSpec(
            algorithm=cfg.algorithm.name,
            keep_ratio=cfg.algorithm.keep_ratio,
            shuffle_times=cfg.algorithm.shuffle_times,
            seed=cfg.trainer.seed,
            vocab_size=vocab_size(self.tokenizer, self.model_path),  # refuses ids outside
            # the async mode's behaviour log-probs (docs/algorithm.md §4, "Stale rollouts")
            logprobs=pb.LOGPROBS_REQUIRED
            if cfg.buffer.store_rollout_logprobs or cfg.trainer.mode == "async"
            else pb.LOGPROBS_OMITTED,
        )
        self.session = BufferSession(
            lambda: connect_buffer(ray.get(self.buffer_actor.address.remote()), cfg.buffer),
            self.run_id,
            self.spec,
            self._count_recovery,
        )

    # ---- setup -------------------------------------------------------------------------

    @property
    def buffer(self) -> ReplayBufferClient:
        """The client of the run's buffer session (a new one after a reconnect)."""
        return self.session.client

    def _count_recovery(self, kind: str) -> None:
        """Count a buffer failure the session recovered from (``reconnect`` or
        ``regenerated_step``)."""
        self.counters[f"buffer/{kind}s"] = self.counters.get(f"buffer/{kind}s", 0) + 1
        self.exporter.count_error("buffer", kind)

    def _load_data(self) -> tuple[list[Prompt], list[Prompt]]:
        """Both splits, tokenised (:func:`load_prompt_splits`); their skipped rows and
        overlong prompts are counted in ``data/skipped_rows`` / ``data/overlong_prompts``."""
        train, val, skipped, overlong = load_prompt_splits(
            self.cfg.data, self.tokenizer, self.processor, self.model_path
        )
        self.counters["data/skipped_rows"] = self.counters.get("data/skipped_rows", 0) + skipped
        self.counters["data/overlong_prompts"] = (
            self.counters.get("data/overlong_prompts", 0) + overlong
        )
        return train, val

    def _resume(self) -> None:
        """Restore everything from the newest checkpoint whose files match its manifest
        (``services.trainer.state``: a damaged or altered one is logged and skipped)."""
        key = run_key(self.cfg.buffer.auth_token)
        ckpt = latest_checkpoint(self.out, key)
        if ckpt is None:
            raise FileNotFoundError(
                f"--resume: no complete checkpoint that matches its manifest under "
                f"{self.out / 'checkpoints'} (the log names any that were rejected)"
            )
        self._restore(ckpt, key)
        # Steps after the checkpoint are regenerated; their stored groups would clash.
        self.session.drop_run()
        logger.info(
            "resumed from %s at step %d, weight version %d",
            ckpt,
            self.state.step,
            self.learner.version,
        )

    def _restore(self, ckpt: Path, key: bytes | None) -> None:
        """Load a verified checkpoint into the learner group and the driver (state, data
        sampler, RNG, counters): what :meth:`_resume` and :meth:`_rebuild_learner` share."""
        files = files_under(read_manifest(ckpt, key), "learner")
        self.learner.load_checkpoint(ckpt / "learner", files)
        self.state = read_state(ckpt, key)
        self.sampler.load_state_dict(self.state.sampler)
        self.counters.update(self.state.counters)

    # ---- the step ----------------------------------------------------------------------

    def _weights(self) -> tuple[int, ray.ObjectRef] | None:
        return self.learner.publish_weights() if self.learner.version > 0 else None

    def _generate(
        self,
        prompts: list[Prompt],
        sampling: SamplingSpec,
        tag: str,
        weights: tuple[int, ray.ObjectRef] | None,
    ) -> Any:
        requests = [
            GenerationRequest(f"{tag}/{p.example.uid}", p.token_ids, p.images) for p in prompts
        ]
        return self.rollout.generate(requests, sampling, weights)

    def _score(self, prompts: list[Prompt], completions: list[Any], n: int) -> list[Any]:
        texts = self.tokenizer.batch_decode(
            [c.token_ids for c in completions], skip_special_tokens=True
        )
        of_rollout = [p for p in prompts for _ in range(n)]
        scores = self.reward.score(
            [
                ScoreRequest(t, p.example.answer, p.text, p.example.columns, len(p.example.images))
                for t, p in zip(texts, of_rollout, strict=True)
            ]
        )
        for error in (s.error for s in scores if s.error is not None):
            self.exporter.count_error("reward", error.split(":", 1)[0])
        return scores

    def _count(self, key: str, amount: float) -> None:
        """Add to a cumulative counter (reported with every step's metrics)."""
        self.counters[key] = self.counters.get(key, 0) + amount

    def step(self, step: int) -> dict[str, float]:
        """Run training step ``step`` (0-based) and return its metrics: in sync mode its
        rollouts are made now, in async mode the producer has made (or is making) them."""
        t0 = time.perf_counter()
        if self.producer is None:
            rollouts = self.produce(step, self._weights(), put=False)
            waited = 0.0
        else:
            rollouts, waited = self.producer.take(step)
        return self.train_on(rollouts, t0, waited)

    def produce(
        self, step: int, weights: tuple[int, ray.ObjectRef] | None, put: bool = True
    ) -> StepRollouts:
        """Steps 1–3 of step ``step``: draw its prompts, generate with ``weights`` (None: the
        initial model), score, group; ``put``: also put the groups into the buffer (the
        async producer does; sync mode puts and draws in one call, :meth:`train_on`)."""
        cfg, n = self.cfg, self.cfg.rollout.n
        times: dict[str, float] = {}
        with self._drawing:
            self._sampler_before[step] = self.sampler.state_dict()
            prompts = [self.train_prompts[i] for i in self.sampler.next_batch()]
        with self.prompts_path.open("a") as f:
            ids = [p.example.uid for p in prompts]
            f.write(json.dumps({"step": step, "prompt_ids": ids}) + "\n")
        sampling = SamplingSpec(
            n=n,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_tokens=cfg.rollout.max_response_length,
            seed=cfg.trainer.seed * 1_000_003 + step,
        )
        with self._pools:
            gen = self._generate(prompts, sampling, f"s{step}", weights)
            times["generate"], times["rollout_sync"] = gen.generate_s, gen.sync_s
            times["generate_engine"] = gen.engine_s  # inside the engines, without serving
            t = time.perf_counter()
            scores = self._score(prompts, gen.completions, n)
            times["reward"] = time.perf_counter() - t
        groups = step_groups(
            self.run_id, step, prompts, gen.completions, scores, n,
            logprobs=self.spec.logprobs == pb.LOGPROBS_REQUIRED,
        )  # fmt: skip
        stored = None
        if put:
            t = time.perf_counter()
            stored = self.session.put(groups)
            times["buffer_put"] = time.perf_counter() - t
        return StepRollouts(step, prompts, gen, scores, groups, stored, times)

    def train_on(
        self, rollouts: StepRollouts, t0: float, waited_s: float = 0.0
    ) -> dict[str, float]:
        """Steps 4–5 on ``rollouts``: draw the step's batch, update, publish; returns the
        step's metrics. ``t0``: when the step began (its ``time/step_s`` counts from
        there); ``waited_s``: how long the learner waited for the rollouts (async)."""
        cfg, step = self.cfg, rollouts.step
        prompts, gen, scores = rollouts.prompts, rollouts.gen, rollouts.scores
        self.last_prompt_ids = [p.example.uid for p in prompts]
        times = dict(rollouts.times)
        t = time.perf_counter()
        self._count("rollout/images", sum(c.images for c in gen.completions if c.index == 0))
        put, sample = self.session.put_and_sample(
            rollouts.groups, step, self.learner.version, put=rollouts.put
        )
        times["buffer"] = time.perf_counter() - t + times.pop("buffer_put", 0.0)
        staleness = [self.learner.version - c.weight_version for c in gen.completions]

        advantages = torch.tensor(put.advantages, dtype=torch.float64)  # the buffer's (§1)
        pair_draws = [0] * sample.pairs_total  # how often ABS drew each kept pair (§3)
        for item in sample.items[::2] if sample.pairs_total else ():
            pair_draws[item.pair_index] += 1
        m = step_metrics(scores, gen, put, sample, advantages, cfg.algorithm.collapse_tau)

        m["learner/skipped_update"] = float(sample.skipped or not sample.items)
        if sample.skipped or not sample.items:
            self.counters["learner/skipped_updates"] = (
                self.counters.get("learner/skipped_updates", 0) + 1
            )
            logger.warning("step %d: every kept pair has weight 0; update skipped", step)
        else:
            # async: the engines' sampling log-probs are the behaviour policy's (§4)
            batch, images = train_batch(sample, behaviour=self.asynchronous)
            self._count("buffer/images", images)
            t = time.perf_counter()
            # One optimizer step on these weights: the update's forward pass gives the old
            # log-probs (LearnerGroup.single_step), a separate pass would repeat it.
            reuse = self.learner.single_step(len(batch))
            old = None if reuse else self.learner.compute_logprobs(batch)
            times["old_logprobs"] = time.perf_counter() - t
            m["learner/old_logprobs_reused"] = float(reuse)
            if cfg.algorithm.kl_coef > 0:  # the KL loss's reference policy (§4)
                t = time.perf_counter()
                batch = batch.with_logprobs(ref=self.learner.compute_logprobs(batch, True))
                times["ref_logprobs"] = time.perf_counter() - t
            t = time.perf_counter()
            minibatches = self._minibatches(sample)
            if minibatches is not None:
                pairs = [it.pair_index for it in sample.items]
                m.update(
                    {f"abs/{k}": v for k, v in minibatch_pair_stats(pairs, minibatches).items()}
                )
            m.update(
                {f"learner/{k}": v for k, v in self.learner.update(batch, old, minibatches).items()}
            )
            times["update"] = time.perf_counter() - t
            t = time.perf_counter()
            self.learner.publish_weights()
            times["publish"] = time.perf_counter() - t
        m["weight_version"] = float(self.learner.version)
        m["time/weight_sync_s"] = times.get("publish", 0.0) + times["rollout_sync"]
        for k, v in times.items():
            m[f"time/{k}_s"] = v
        m["time/step_s"] = time.perf_counter() - t0
        m.update(self._overlap_metrics(staleness, times, m["time/step_s"], waited_s))
        m.update(self.counters)
        self.exporter.observe_step(step + 1, m, advantages.tolist(), pair_draws, staleness)
        self.exporter.count_error("rollout", "resent", gen.resent)
        return m

    def _overlap_metrics(
        self, staleness: list[int], times: dict[str, float], step_s: float, waited_s: float
    ) -> dict[str, float]:
        """The step's staleness (weight versions each rollout lags the learner's policy at
        the draw: 0 in sync mode) and each side's idle seconds: the consumer (learner) waited
        ``waited_s`` for the rollouts in async mode, the whole rollout phase in sync mode;
        the producer (rollout side) waited on the staleness bound in async mode (since the
        previous step), through the learner's phases in sync mode."""
        m = {
            "staleness/mean": sum(staleness) / max(len(staleness), 1),
            "staleness/max": float(max(staleness, default=0)),
        }
        for k in range(self.cfg.buffer.max_staleness + 1):
            m[f"staleness/share_{k}"] = sum(s == k for s in staleness) / max(len(staleness), 1)
        if self.producer is not None:
            idle = self.producer.idle_s
            m["time/producer_idle_s"] = idle - self._producer_idle_s
            self._producer_idle_s = idle
            m["time/consumer_idle_s"] = waited_s
        else:
            rollout_s = times["generate"] + times.get("reward", 0.0)
            m["time/consumer_idle_s"] = rollout_s
            m["time/producer_idle_s"] = max(step_s - rollout_s, 0.0)
        return m

    def _minibatches(self, sample: Any) -> list[list[int]] | None:
        """The rows of each optimizer mini-batch of a sampled PTS batch: under
        ``shuffle_r1`` by ``algorithm.abs_minibatch_order`` over the rounds the buffer drew;
        under ``grpo+pts`` (one round, no re-draw) consecutive mini-batches, as before the
        order existed. None under ``grpo``: consecutive runs of rollouts."""
        if not sample.round_sizes:
            return None
        a = self.cfg.algorithm
        order = a.abs_minibatch_order if a.name == "shuffle_r1" else "sequential"
        return abs_minibatch_rows(
            list(sample.round_sizes), self.learner.rollouts_per_minibatch, order
        )

    def evaluate(self) -> dict[str, float]:
        """Mean pass@1 on the validation prompts at ``rollout.val_temperature`` (0: greedy)
        with ``rollout.val_n`` samples each (docs/algorithm.md §7)."""
        cfg = self.cfg.rollout
        sampling = SamplingSpec(
            n=cfg.val_n,
            temperature=cfg.val_temperature,  # 0: greedy
            top_p=cfg.top_p,
            max_tokens=cfg.max_response_length,
            seed=self.cfg.trainer.seed,
        )
        t = time.perf_counter()
        with self._pools:  # async: between two of the producer's steps
            gen = self._generate(self.val_prompts, sampling, "val", self._weights())
            scores = self._score(self.val_prompts, gen.completions, cfg.val_n)
        result = {
            "val/accuracy": sum(s.accuracy for s in scores) / len(scores),
            "val/reward": sum(s.reward for s in scores) / len(scores),
            "val/format": sum(s.format for s in scores) / len(scores),
            "val/samples": float(len(scores)),
            "time/eval_s": time.perf_counter() - t,
        }
        self.exporter.observe_step(self.state.step, result)
        return result

    def save(self) -> Path:
        """Checkpoint the steps done (``services.trainer.state.saving_checkpoint``: written
        under a temporary name with a manifest, then renamed), keep the newest
        ``KEEP_CHECKPOINTS``; returns the folder.

        Raises:
            CheckpointWriteError: no space, quota or permission to write it: an operator
                error, which stops the run (not a learner failure; nothing is restarted).
        """
        # the sampler as it was before drawing the next step to train (the async producer
        # may have drawn further)
        with self._drawing:
            self.state.sampler = self._sampler_before.get(
                self.state.step, self.sampler.state_dict()
            )
        self.state.counters = dict(self.counters)
        key = run_key(self.cfg.buffer.auth_token)
        with saving_checkpoint(self.out, self.state.step, key) as folder:
            self.learner.save_checkpoint(folder / "learner")
            write_state(folder, self.state)
        saved = checkpoint_dir(self.out, self.state.step)
        prune_checkpoints(self.out, KEEP_CHECKPOINTS, saved)
        return saved

    def run(self) -> RunSummary:
        """Train until ``trainer.total_steps`` (or :meth:`stop`); returns where everything
        was written."""
        cfg = self.cfg.trainer
        started = time.perf_counter()
        last: dict[str, Any] = {}
        ckpt = latest_checkpoint(self.out, verify=False)  # for the summary; loaded: verified
        self.trackers = open_trackers(cfg, self.state.step if self.resumed else None)
        if cfg.eval_every and cfg.val_before_train and self.state.step == 0:
            logger.info("evaluating on %d held-out prompts before training", len(self.val_prompts))
            before = self.evaluate()
            logger.info("held-out accuracy before training: %.3f", before["val/accuracy"])
            self._record(-1, before)  # step -1: before step 0's update
        dtypes = {c.dtype for c in self.precision.values()}
        bar = tqdm(
            initial=self.state.step,
            total=cfg.total_steps,
            desc=f"train [{'/'.join(sorted(dtypes))}]",
            unit="step",
            dynamic_ncols=True,
        )
        self._start_producer()
        stopping = False
        while self.state.step < cfg.total_steps and not stopping:
            step = self.state.step
            try:
                metrics = self.step(step)
                self.state.step = step + 1
                self._sampler_before.pop(step, None)
                if self.producer is not None:  # it may go on to step + 1 + max_staleness
                    self.producer.trained(self.state.step, self._weights())
                stopping = self._stop.is_set()  # read once: this step is then the last
                last_step = stopping or self.state.step == cfg.total_steps
                if cfg.eval_every and (self.state.step % cfg.eval_every == 0 or last_step):
                    metrics.update(self.evaluate())
                self._record(step, metrics)
                if cfg.save_every and (self.state.step % cfg.save_every == 0 or last_step):
                    ckpt = self.save()
            except LearnerFailedError as exc:
                stopping = False  # the steps since the checkpoint come first (stop() holds)
                self._stop_producer()  # it drew steps the restored sampler draws again
                self._rebuild_learner(exc)
                self._start_producer()
                bar.n = self.state.step
                continue
            last = metrics
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['reward/mean']:.3f}",
                acc=f"{metrics['reward/accuracy']:.3f}",
                loss=f"{metrics.get('learner/policy_loss', math.nan):.4f}",
                step_s=f"{metrics['time/step_s']:.1f}",
            )
        bar.close()
        self._stop_producer()
        if self.learner.version > 0:  # every rollout worker ends on the newest weights
            self.rollout.sync(self.learner.publish_weights())
        plot = plot_metrics(self.metrics_path, self.out / "metrics.png") if last else None
        summary = RunSummary(
            steps=self.state.step,
            output_dir=self.out,
            metrics_path=self.metrics_path,
            plot_path=plot,
            checkpoint=ckpt,
            wall_s=time.perf_counter() - self.created,
            train_s=time.perf_counter() - started,
            last_metrics=last,
            held_out=held_out_summary(read_metrics(self.metrics_path)),
            path=self.out / "summary.json",
        )
        record = {
            "run": self.run_id,
            "cpu": self.cpu,
            "dtype": {role: c.dtype for role, c in self.precision.items()},
            "steps": summary.steps,
            "wall_s": summary.wall_s,
            "train_s": summary.train_s,
            **(summary.held_out or {}),
        }
        summary.path.write_text(json.dumps(record, indent=1) + "\n")
        return summary

    def stop(self) -> None:
        """Make the step in progress (or, between steps, the next one) the last of
        :meth:`run`, as if it were step ``trainer.total_steps``: it is evaluated
        (``eval_every > 0``) and saved (``save_every > 0``), every rollout worker then loads
        its weights, and :meth:`run` returns with ``RunSummary.steps`` the steps done.

        For a caller in another thread (a test's operator, a time budget): returns at once,
        and a second call changes nothing. Async mode drops what the producer generated
        beyond that step, as at the end of every run.
        """
        self._stop.set()

    def _start_producer(self) -> None:
        """Async mode: start producing from the step to train next, up to
        ``buffer.max_staleness`` steps ahead, with the newest published weights."""
        if not self.asynchronous or self.state.step >= self.cfg.trainer.total_steps:
            return
        self._sampler_before.clear()
        self.producer = RolloutProducer(
            self.produce,
            self.state.step,
            self.cfg.trainer.total_steps,
            self.cfg.buffer.max_staleness,
            self._weights(),
        )
        self._producer_idle_s = 0.0

    def _stop_producer(self) -> None:
        """Stop the producer after its step in progress (its results are dropped) and put
        the data sampler back where the learner is."""
        if self.producer is None:
            return
        self.producer.stop()
        self.producer = None
        before = self._sampler_before.get(self.state.step)
        if before is not None:
            self.sampler.load_state_dict(before)
        self._sampler_before.clear()

    def _record(self, step: int, metrics: dict[str, float]) -> None:
        """Write step ``step``'s row to ``metrics.jsonl``, then to the trackers (at
        ``step + 1`` training steps done)."""
        self.metrics.write(step, metrics)
        if self.trackers is not None:
            self.trackers.log(step + 1, metrics)

    def _rebuild_learner(self, failure: LearnerFailedError) -> None:
        """A learner rank died: start a new learner group, restore it and the driver's state
        (data sampler, RNG, counters) from the newest checkpoint (or from the start without
        one), and let :meth:`run` continue from there — the steps after the checkpoint are
        trained again on the same prompts. At most ``trainer.max_learner_restarts`` times,
        then ``failure`` propagates.

        The restored weights get a new, higher weight version than any published before, so
        every rollout worker reloads them (a worker never keeps weights the learner lost).
        """
        rebuilt = int(self.counters.get("learner/rebuilt", 0)) + 1
        if rebuilt > self.cfg.trainer.max_learner_restarts:
            raise failure
        logger.error(
            "learner failed at step %d (%s); rebuilding it (%d of at most %d)",
            self.state.step,
            failure,
            rebuilt,
            self.cfg.trainer.max_learner_restarts,
        )
        newest = self.learner.version
        self.learner.shutdown(graceful=False)
        self.learner = LearnerGroup(self.cfg, self.model_path)
        key = run_key(self.cfg.buffer.auth_token)
        ckpt = latest_checkpoint(self.out, key)
        if ckpt is None:
            logger.error("no verified checkpoint in %s: training restarts from step 0", self.out)
            self.state = TrainerState()
            self.sampler.load_state_dict({**self.sampler.state_dict(), "epoch": 0, "position": 0})
            torch.manual_seed(self.cfg.trainer.seed)
        else:
            self._restore(ckpt, key)
        self.counters["learner/rebuilt"] = rebuilt
        self.exporter.count_error("learner", "rebuilt")
        self.learner.version = max(newest, self.learner.version) + 1
        self.session.drop_run()  # the steps after the checkpoint are put again
        logger.info(
            "learner rebuilt from %s; continuing at step %d with weight version %d",
            ckpt or "the initial model",
            self.state.step,
            self.learner.version,
        )

    def close(self, abandon: bool = False) -> None:
        """Stop the roles: delete the Serve applications (a rollout replica first finishes its
        request, up to ``rollout.drain_timeout_s``), let the learner ranks leave their process
        group, stop the buffer and the embedded Redis.

        ``abandon=True`` (the run was interrupted) waits for none of that: the Serve
        applications are deleted without waiting for their drain and Ray is shut down — a
        local Ray that this process started stops with every worker and the engines inside
        them; on a cluster the run's other actors end with the driver's job.
        """
        if self.producer is not None:  # a run that stopped mid-way (abandoned, or raised)
            self.producer.stop(timeout_s=0 if abandon else 60)
            self.producer = None
        if abandon:
            from ray import serve

            for app in (self.rollout.app, self.reward.app):
                try:
                    serve.delete(app, _blocking=False)
                except Exception as exc:  # abandoning: report and go on
                    logger.warning("deleting Serve application %s: %s", app, exc)
            ray.shutdown()
        else:
            for role in (self.rollout, self.reward, self.learner):
                try:
                    role.shutdown()
                except Exception as exc:  # shutting down: report and go on
                    logger.warning("shutdown of %s: %s", type(role).__name__, exc)
            ray.kill(self.buffer_actor, no_restart=True)
        if self.trackers is not None:
            self.trackers.close(finished=self.state.step >= self.cfg.trainer.total_steps)
        self.exporter.close()
        self.session.close()
        if self._redis is not None:
            self._redis.close()
        self.lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        self.close(abandon=isinstance(exc, KeyboardInterrupt))  # Ctrl-C: stop, do not drain


def _discard_learner(starting: Future[LearnerGroup]) -> None:
    """Stop the learner ranks a failed :class:`Trainer` start was bringing up (after their
    start ends, so no rank is left behind); a failure of their own start is already moot."""
    try:
        group = starting.result()
    except BaseException:  # the start that failed first is the one the caller reports
        return
    group.shutdown(graceful=False)
