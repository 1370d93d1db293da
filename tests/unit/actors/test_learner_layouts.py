"""Learner layouts beside test_learner.py's 2 ranks x 1 thread with fixed micro-batches: one
rank of two threads (``learner.threads_per_rank``) cutting its shard by a token budget
(``learner.micro_batch_tokens``), with and without each prompt run once
(``learner.share_prompts``), on a real Ray, against the single-process reference (full rows).

Under a token budget each micro-batch's token-mean loss is weighted by its share of the
shard's response tokens, so the step equals one token-mean over the whole shard however it
was cut: the reference runs the batch as one micro-batch.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import ray
import torch

from actors.learner import LearnerGroup
from shuffle_r1.minibatches import positions_run, prompt_keys, token_budget_microbatches
from shuffle_r1.models import build_tiny_llama
from shuffle_r1.training import sequence_lengths
from tests.unit.actors.learner_reference import reference_update
from tests.unit.actors.test_learner import (
    assert_weights_close,
    load_model,
    make_batch,
    make_config,
    reference_logprobs,
    text_logprobs,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

BUDGET = 40  # token positions: make_batch's rows are 2-22 tokens: 2-5 micro-batches of 8 rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.mark.parametrize("share_prompts", [True, False])
def test_one_rank_of_two_threads_with_a_token_budget_equals_one_micro_batch(
    tiny: Any, share_prompts: bool
) -> None:
    cfg = make_config()
    cfg.learner.num_ranks, cfg.learner.threads_per_rank = 1, 2
    cfg.learner.micro_batch_tokens = BUDGET
    cfg.learner.share_prompts = share_prompts
    batch = make_batch(8, seed=1)
    group = LearnerGroup(cfg, tiny)
    try:
        ping = ray.get(group.workers[0].ping.remote())
        logp = group.compute_logprobs(batch)
        metrics = group.update(batch, None)
        _, ref = group.publish_weights()
        weights = ray.get(ref)
    finally:
        group.shutdown()
    assert (ping["threads"], ping["share_prompts"]) == (2, share_prompts)

    lengths = sequence_lengths(batch)
    prompts = prompt_keys(batch.prompt_token_ids) if share_prompts else None
    plan = token_budget_microbatches(lengths, BUDGET, prompts)
    assert len(plan) > 1, "the budget must cut the shard, or nothing is tested"
    assert metrics["microbatches_per_rank"] == len(plan)
    assert metrics["tokens"] == sum(lengths)
    assert metrics["positions"] == positions_run(lengths, plan, prompts)
    assert metrics["positions_per_token"] == metrics["positions"] / metrics["tokens"]
    assert metrics["peak_memory_mb"] > 0

    reference_cfg = make_config()
    reference_cfg.learner.num_ranks, reference_cfg.learner.micro_batch_size = 1, len(batch)
    model = load_model(tiny)
    t = cfg.rollout.temperature
    torch.testing.assert_close(logp, reference_logprobs(model, batch, t), atol=1e-5, rtol=0)
    le = cfg.learner
    optimizer = torch.optim.AdamW(model.parameters(), lr=le.lr, weight_decay=le.weight_decay)
    norms = reference_update(
        model, optimizer, batch, logp, reference_cfg, partial(text_logprobs, model, temperature=t)
    )
    assert metrics["grad_norm"] == pytest.approx(norms[0], rel=1e-5)
    assert_weights_close(weights, model.state_dict())
