"""The learner as one: :class:`LearnerGroup`, the single controller the trainer calls, drives
N :class:`~actors.learner.worker.LearnerWorker` ranks.

It cuts a :class:`~shuffle_r1.training.TrainBatch` as docs/algorithm.md §3.4 says — mini-batches
in order, each into contiguous pair-aligned shards, one per rank, each into micro-batches — and
averages the metrics. Every rank runs the same number of micro-batches (a short shard is
padded with rollouts that carry no signal), so the ranks' collectives stay in step.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import ray
import torch
from torch import Tensor

from actors.learner.worker import LOSS_METRICS, WRITE_ADVICE, LearnerWorker
from shuffle_r1.config import Config
from shuffle_r1.integrity import CheckpointRejectedError, CheckpointWriteError, full_disk_error
from shuffle_r1.minibatches import (
    microbatch_plans,
    minibatch_slices,
    pair_aligned_shards,
    positions_run,
    prompt_keys,
    rollouts_per_optimizer_step,
)
from shuffle_r1.precision import resolve_dtype
from shuffle_r1.training import TrainBatch, sequence_lengths

logger = logging.getLogger(__name__)


class LearnerFailedError(RuntimeError):
    """A rank of a :class:`LearnerGroup` failed (raised, or its process died); the group has
    killed every rank. Build a new group (from a checkpoint) to go on."""


class LearnerGroup:
    """N :class:`LearnerWorker` ranks driven as one learner (the trainer's single controller).

    Args:
        cfg: the run's config; reads ``learner`` (ranks, backend, optimizer, batch sizes),
            ``algorithm`` (loss, α for the mini-batch size), ``rollout.n`` and
            ``rollout.temperature`` (log-probs are ``log_softmax(logits / T)``).
        model_path: a transformers folder every rank can read; default
            ``shuffle_r1.models.resolve_model_path(cfg.learner.model_path)``.

    Needs a running Ray with ``learner.num_ranks`` free CPUs (and GPUs when
    ``learner.num_gpus_per_rank > 0``). If a rank fails, the group kills every rank (the
    others would wait on it in a collective) and raises :class:`LearnerFailedError`; build a
    new group to go on.

    Attributes:
        version: the weight version: 0 as loaded (or the checkpoint's), +1 per :meth:`update`
            that stepped the optimizer.
        last_publish_s: seconds the last :meth:`publish_weights` took.
        last_publish_parts: rank 0's seconds per part of it (``LearnerWorker.publish``).
    """

    def __init__(self, cfg: Config, model_path: str | Path | None = None) -> None:
        if model_path is None:
            from shuffle_r1.models import resolve_model_path

            model_path = resolve_model_path(cfg.learner.model_path)
        self.cfg = cfg
        self.model_path = str(model_path)
        self.version = 0
        self.last_publish_s = 0.0
        self.last_publish_parts: dict[str, float] = {}
        self._published: tuple[int, ray.ObjectRef] | None = None
        rollout_on_cuda = cfg.rollout.num_gpus_per_worker > 0
        self.publish_dtype = resolve_dtype(cfg.rollout.dtype, cuda=rollout_on_cuda).dtype
        le = cfg.learner
        actor = ray.remote(LearnerWorker).options(
            num_cpus=le.threads_per_rank,
            num_gpus=le.num_gpus_per_rank,
            resources=dict(le.ray_resources) or None,
        )
        # Actor handles: their methods are typed by Ray at run time only.
        self.workers: list[Any] = [
            actor.remote(rank, le.num_ranks, cfg, self.model_path) for rank in range(le.num_ranks)
        ]
        started = time.perf_counter()
        address = self._gather([self.workers[0].master_address.remote()])[0]
        self._gather([w.setup.remote(*address) for w in self.workers])
        # whether the ranks run shuffle_r1/shared_prompt.py's layout (a text model and
        # learner.share_prompts): the token budget then packs a prompt's rollouts together
        self.share_prompts = bool(self._gather([self.workers[0].ping.remote()])[0]["share_prompts"])
        logger.info(
            "learner: %d %s ranks on %s ready in %.1f s",
            le.num_ranks,
            le.backend,
            self.model_path,
            time.perf_counter() - started,
        )

    @property
    def rollouts_per_minibatch(self) -> int:
        """Rollouts per optimizer step (``minibatches.rollouts_per_optimizer_step``, α-scaled)."""
        return rollouts_per_optimizer_step(
            self.cfg.learner.global_batch_size,
            self.cfg.rollout.n,
            self.cfg.algorithm.effective_keep_ratio,
        )

    def _gather(self, refs: list[ray.ObjectRef]) -> list[Any]:
        """Results in order; on the first failure kill every rank and raise."""
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
        except Exception as exc:
            self.shutdown(graceful=False)
            raise LearnerFailedError(
                f"a learner rank failed; the learner group is shut down: {exc}"
            ) from exc
        return ray.get(refs)

    def _run(
        self, method: str, batch: TrainBatch, **kwargs: Any
    ) -> tuple[list[tuple[slice, Any]], int, int]:
        """Call ``method(shard, plan, **kwargs)`` on every rank with its pair-aligned shard and its
        micro-batches (``minibatches.microbatch_plans``: the same count on every rank).

        Returns ``(shard, result)`` per rank, the micro-batches each rank ran, and the token
        positions all ranks ran (``minibatches.positions_run``)."""
        if not self.workers:
            raise RuntimeError("the learner group is shut down")
        shards = pair_aligned_shards(len(batch), len(self.workers))
        lengths = sequence_lengths(batch)
        le = self.cfg.learner
        prompts = prompt_keys(batch.prompt_token_ids) if self.share_prompts else None
        shard_prompts = None if prompts is None else [prompts[s] for s in shards]
        plans = microbatch_plans(
            [lengths[s] for s in shards], le.micro_batch_size, le.micro_batch_tokens, shard_prompts
        )
        positions = sum(
            positions_run(lengths[s], plan, None if prompts is None else prompts[s])
            for s, plan in zip(shards, plans, strict=True)
        )
        refs = [
            getattr(w, method).remote(batch.select(s), plan, **kwargs)
            for w, s, plan in zip(self.workers, shards, plans, strict=True)
        ]
        return list(zip(shards, self._gather(refs), strict=True)), len(plans[0]), positions

    def compute_logprobs(self, batch: TrainBatch, reference: bool = False) -> Tensor:
        """Log-probs ``(B, L)`` (nats, float32, CPU) of the response tokens under the current
        weights, ``L = batch.max_response_len``, 0 past each response. The batch is split
        across the ranks in contiguous pair-aligned shards; rows come back in order.
        ``reference``: under the reference policy of the KL loss instead (the initial model,
        frozen; ``algorithm.kl_coef > 0``), what :meth:`update` needs as
        ``batch.ref_logprobs``.

        Raises:
            ValueError: the batch has an odd number of rollouts (pairs cannot be kept whole),
                or ``reference`` while ``algorithm.kl_coef`` is 0 (no reference policy is
                loaded then).
        """
        if reference and self.cfg.algorithm.kl_coef <= 0:
            raise ValueError(
                "reference log-probs need a reference policy, and none is loaded: "
                f"algorithm.kl_coef is {self.cfg.algorithm.kl_coef}"
            )
        out = torch.zeros(len(batch), batch.max_response_len)
        for rows, part in self._run("compute_logprobs", batch, reference=reference)[0]:
            out[rows, : part.shape[1]] = part
        return out

    def single_step(self, num_rollouts: int) -> bool:
        """Whether an update on ``num_rollouts`` rollouts is one optimizer step on the current
        weights (one mini-batch, ``learner.ppo_epochs`` = 1). Then every micro-batch's forward
        pass runs on the weights that would compute the old log-probs, so :meth:`update` may
        take them from that pass (``old_logprobs=None``) and skip a forward pass over the
        batch; the loss and the gradient are the same."""
        return self.cfg.learner.ppo_epochs == 1 and num_rollouts <= self.rollouts_per_minibatch

    def update(
        self,
        batch: TrainBatch,
        old_logprobs: Tensor | None,
        minibatches: list[list[int]] | None = None,
    ) -> dict[str, float]:
        """Train on ``batch`` (docs/algorithm.md §3.4, §4): ``learner.ppo_epochs`` passes over its
        mini-batches, in order; one optimizer step each, split across ranks and
        micro-batches (see ``LearnerWorker.train_step``). The mini-batches are
        ``minibatches`` when given, else consecutive runs of :attr:`rollouts_per_minibatch`
        rollouts.

        Args:
            batch: rollouts, pairs adjacent; ``batch.ref_logprobs`` is needed when
                ``algorithm.kl_coef > 0``. With ``batch.behaviour_logprobs`` (rollouts that
                older weights sampled) the loss is the decoupled one, each token weighted by
                ``min(exp(old - behaviour), algorithm.behaviour_imp_cap)``
                (docs/algorithm.md §4, "Off-policy rollouts").
            old_logprobs: ``(B, L)`` log-probs of the batch under the weights it was drawn
                with, as :meth:`compute_logprobs` returns them; None when
                :meth:`single_step` holds: the update's own forward pass gives them
                (detached; the ratio is exactly 1).
            minibatches: the rows of each optimizer mini-batch (an ABS batch's layout,
                ``shuffle_r1.minibatches.abs_minibatch_rows``); both rollouts of a pair in one.

        Returns:
            means over micro-batches of ``policy_loss``, ``pg_loss``, ``kl``,
            ``clip_fraction``, ``approx_kl``, ``behaviour_imp_weight`` and
            ``behaviour_truncated_fraction`` (1.0 and 0.0 without behaviour log-probs);
            mean ``grad_norm`` over optimizer steps (before clipping); ``num_optimizer_steps``
            (steps taken; a non-finite gradient skips one); ``lr``; ``tokens`` (prompt +
            response tokens trained, all ranks), ``positions`` (token positions the
            micro-batches ran, padding included, a shared prompt once) and
            ``positions_per_token`` (positions / tokens: above 1 is padding, below 1 what
            shared prompts saved); ``microbatches_per_rank`` (forward/backward passes each
            rank ran, padding ones included); ``peak_memory_mb`` (the largest per-micro-batch
            peak of any rank, ``LearnerWorker.train_step``).

        Raises:
            ValueError: an empty or odd-sized batch, ``kl_coef > 0`` without ref log-probs,
                or ``old_logprobs=None`` for more than one optimizer step.
        """
        if len(batch) == 0:
            raise ValueError("update() got an empty batch; skip the update instead")
        one_step = self.single_step(len(batch)) and (minibatches is None or len(minibatches) < 2)
        if old_logprobs is None and batch.old_logprobs is None and not one_step:
            raise ValueError(
                f"update() without old_logprobs needs one optimizer step, but {len(batch)} "
                f"rollouts make {math.ceil(len(batch) / self.rollouts_per_minibatch)} "
                f"mini-batches x {self.cfg.learner.ppo_epochs} epochs: later steps run on "
                "updated weights; pass compute_logprobs(batch)"
            )
        if self.cfg.algorithm.kl_coef > 0 and batch.ref_logprobs is None:
            raise ValueError(
                f"algorithm.kl_coef={self.cfg.algorithm.kl_coef} needs batch.ref_logprobs"
            )
        if old_logprobs is not None:
            batch = batch.with_logprobs(old=old_logprobs)
        records: list[dict[str, float]] = []
        norms, steps, lr = [], 0, float("nan")
        tokens, positions, peak, micro_per_rank = 0, 0, 0.0, 0
        for _ in range(self.cfg.learner.ppo_epochs):
            cuts = minibatches or minibatch_slices(len(batch), self.rollouts_per_minibatch)
            for rows in cuts:
                mini = batch.select(rows)
                ran, micro, ran_positions = self._run("train_step", mini)
                results = [r for _, r in ran]
                records.extend(m for r in results for m in r["micro"])
                norms.append(results[0]["grad_norm"])
                steps += int(results[0]["stepped"])
                lr = results[0]["lr"]
                tokens += sum(sequence_lengths(mini))
                positions += ran_positions
                peak = max([peak, *(r["peak_memory_mb"] for r in results)])
                micro_per_rank += micro
        if steps:
            self.version += 1
        metrics = {k: sum(r[k] for r in records) / len(records) for k in LOSS_METRICS}
        metrics.update(grad_norm=sum(norms) / len(norms), num_optimizer_steps=float(steps), lr=lr)
        metrics.update(
            tokens=float(tokens),
            positions=float(positions),
            positions_per_token=positions / tokens if tokens else 0.0,
            microbatches_per_rank=float(micro_per_rank),
            peak_memory_mb=peak,
        )
        return metrics

    def publish_weights(self) -> tuple[int, ray.ObjectRef]:
        """``(version, ref)``: the full state dict put into the object store once, from rank
        0, in the rollout engines' dtype (:attr:`publish_dtype`; a bf16 copy would round
        away updates a float32 engine can use), as one flat buffer per dtype
        (``LearnerWorker.publish``): ``ray.get(ref)`` gives a ``dict[str, Tensor]`` of
        read-only CPU views into it, keys as in transformers, tied names on one tensor. A
        second call at the same version returns the same ref. The time taken is in
        :attr:`last_publish_s`, rank 0's seconds per part in :attr:`last_publish_parts`.
        """
        if self._published is not None and self._published[0] == self.version:
            return self._published
        started = time.perf_counter()
        results = self._gather([w.publish.remote(self.publish_dtype) for w in self.workers])
        refs, self.last_publish_parts = results[0]
        self._published = (self.version, refs[0])
        self.last_publish_s = time.perf_counter() - started
        return self._published

    def save_checkpoint(self, directory: str | Path) -> None:
        """Write model, optimizer and version to ``directory`` (layout:
        ``LearnerWorker.save_checkpoint``); a folder every rank can reach.

        Raises:
            CheckpointWriteError: a rank could not write for lack of space, quota or
                permission; an operator error, not a learner failure (the ranks are stopped,
                as after any failure of a collective).
            LearnerFailedError: a rank failed otherwise.
        """
        refs = [w.save_checkpoint.remote(str(directory), self.version) for w in self.workers]
        try:
            self._gather(refs)
        except LearnerFailedError as exc:
            # Ray delivers the rank's error as a RayTaskError whose ``cause`` it is
            error = full_disk_error(exc, Path(directory))
            if isinstance(error, CheckpointWriteError):
                raise error from exc
            if error is not None:
                raise CheckpointWriteError.wrap(
                    error, f"saving checkpoint {directory}", Path(directory), WRITE_ADVICE
                ) from exc
            raise

    def load_checkpoint(self, directory: str | Path, files: dict[str, dict[str, Any]]) -> None:
        """Restore model, optimizer and version from ``directory``; any rank count may load it
        (FSDP2; DeepSpeed needs the same).

        ``files`` are the expected files of ``directory`` from its checkpoint's verified
        manifest (``services.trainer.state.files_under``). Every rank first checks the folder
        as it sees it (``LearnerWorker.check_checkpoint``: a rank on another node may see
        another copy); only when all match does any rank deserialise anything.

        Raises:
            CheckpointRejectedError: a rank found a file missing, extra, or different; nothing
                was loaded and the group is unchanged.
        """
        refs = [w.check_checkpoint.remote(str(directory), files) for w in self.workers]
        found = [f"rank {r}: {p}" for r, ps in enumerate(self._gather(refs)) for p in ps]
        if found:
            more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
            raise CheckpointRejectedError(
                f"checkpoint {directory} does not match its manifest as the learner ranks see "
                f"it: {'; '.join(found[:5])}{more}; nothing was loaded"
            )
        metas = self._gather([w.load_checkpoint.remote(str(directory)) for w in self.workers])
        self.version = int(metas[0]["version"])
        self._published = None

    def shutdown(self, graceful: bool = True) -> None:
        """Stop every rank (idempotent). ``graceful`` first lets them leave the process group."""
        workers, self.workers = self.workers, []
        if graceful and workers:
            try:
                ray.get([w.shutdown.remote() for w in workers], timeout=60)
            except Exception as exc:  # a dead rank: kill the rest anyway
                logger.warning("learner shutdown: %s", exc)
        for w in workers:
            ray.kill(w)
