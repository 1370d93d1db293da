"""The single-process update a learner group must reproduce (tests of actors/learner/)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from shuffle_r1.algos import policy_loss
from shuffle_r1.config import Config
from shuffle_r1.minibatches import (
    microbatch_count,
    microbatch_slices,
    minibatch_slices,
    pair_aligned_shards,
    rollouts_per_optimizer_step,
)
from shuffle_r1.training import TrainBatch, collate


def reference_update(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: TrainBatch,
    old_logprobs: torch.Tensor,
    cfg: Config,
    logprobs: Callable[[TrainBatch], torch.Tensor],
) -> list[float]:
    """One process, no sharding: the update the learner group must reproduce.

    Each mini-batch is one optimizer step; its micro-batches are those the ranks would run
    (the same pair-aligned cut), each token-mean loss weighted 1 / (micro-batches per rank ·
    ranks), as gradient accumulation plus FSDP's gradient averaging make it. Padding
    micro-batches carry no gradient and are skipped. With ``algorithm.kl_coef > 0`` the
    loss adds the KL to ``batch.ref_logprobs``; with ``batch.behaviour_logprobs`` it is the
    decoupled loss, capped at ``algorithm.behaviour_imp_cap``. ``logprobs(micro_batch)`` gives the
    ``(B, L)`` response log-probs under ``model``, with gradients. Returns the grad norm of
    each step.
    """
    le, alg = cfg.learner, cfg.algorithm
    batch = batch.with_logprobs(old=old_logprobs)
    norms = []
    model.train()
    size = rollouts_per_optimizer_step(le.global_batch_size, cfg.rollout.n, alg.keep_ratio)
    for rows in minibatch_slices(len(batch), size):
        mini = batch.select(rows)
        shards = pair_aligned_shards(len(mini), le.num_ranks)
        count = microbatch_count([s.stop - s.start for s in shards], le.micro_batch_size)
        for shard in shards:
            for micro in microbatch_slices(shard.stop - shard.start, le.micro_batch_size, count):
                if micro.stop == micro.start:
                    continue
                part = mini.select(slice(shard.start + micro.start, shard.start + micro.stop))
                c = collate(part)
                out = policy_loss(
                    logprobs(part),
                    c["old_logprobs"],
                    c["advantages"],
                    c["response_mask"],
                    alg.clip_ratio_low,
                    alg.clip_ratio_high,
                    alg.loss_agg_mode,
                    ref_logprobs=c.get("ref_logprobs"),
                    kl_coef=alg.kl_coef,
                    kl_type=alg.kl_type,
                    behaviour_logprobs=c.get("behaviour_logprobs"),
                    behaviour_imp_cap=alg.behaviour_imp_cap,
                )
                (out.loss / (count * le.num_ranks)).backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), le.grad_clip)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return norms
