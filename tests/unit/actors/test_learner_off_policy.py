"""The decoupled loss of off-policy rollouts (docs/algorithm.md §4, "Off-policy rollouts") on a
real Ray: 2 FSDP2 ranks (gloo, CPU) on the tiny random Llama against a single-process
reference that shares no code with the sharding (issue #21).

A batch of 14 rollouts (two optimizer steps, the second on weights the first moved, with a
padding micro-batch on one rank) carries behaviour log-probs up to 1 nat off the old ones, so
about a third of the tokens get an importance weight over the cap, 1.5 (not the default 5.0:
a learner that dropped ``algorithm.behaviour_imp_cap`` would fail). The update must move the
weights exactly as a plain transformers model, torch AdamW and the decoupled loss do, and
differently from the on-policy loss and from the default cap.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import ray
import torch

from actors.learner import LearnerGroup
from shuffle_r1.config import Config
from shuffle_r1.models import build_tiny_llama
from shuffle_r1.training import TrainBatch
from tests.unit.actors.learner_reference import reference_update
from tests.unit.actors.test_learner import (
    assert_weights_close,
    load_model,
    make_batch,
    make_config,
    max_weight_diff,
    reference_logprobs,
    text_logprobs,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

IMP_CAP = 1.5
MAX_OFF = 1.0  # nats between the behaviour and the old log-probs, at most


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def off_policy_config(cap: float = IMP_CAP) -> Config:
    cfg = make_config()
    cfg.algorithm.behaviour_imp_cap = cap
    return cfg


def with_behaviour(batch: TrainBatch, old: torch.Tensor) -> TrainBatch:
    """``batch`` with behaviour log-probs ``old + u``, u uniform in ±MAX_OFF per token:
    importance weights exp(-u) from e^-1 to e, about 30 % of them over IMP_CAP.

    u is a multiple of 1/64, so ``old + u`` is exact in float32 (|old| < 16 here) unless
    the sum crosses a power of two, and ``old - behaviour`` is then exactly -u whatever
    ``old`` rounded to: the learner and the reference weight a token alike. With u unrounded
    their weights differ by ~1e-7 relative, which moved 260 near-zero gradient elements of
    the embedding across AdamW's first step (``test_learner.WEIGHT_OUTLIERS``)."""
    gen = torch.Generator().manual_seed(5)
    noise = ((torch.rand(old.shape, generator=gen) * 2 - 1) * MAX_OFF * 64).round() / 64
    assert float(old.abs().max()) + MAX_OFF < 16, "old + u would round"
    return batch.with_logprobs(behaviour=old + noise)


def reference_run(cfg: Config, model: torch.nn.Module, behaviour: bool) -> list[float]:
    """The same update in one process: old log-probs on the initial weights, then the two
    optimizer steps (the decoupled loss if ``behaviour``); returns the grad norms."""
    t = cfg.rollout.temperature
    batch = make_batch(14, seed=2)
    old = reference_logprobs(model, batch, t)
    if behaviour:
        batch = with_behaviour(batch, old)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learner.lr, weight_decay=0.01)
    grad_logprobs = partial(text_logprobs, model, temperature=t)
    return reference_update(model, optimizer, batch, old, cfg, grad_logprobs)


@pytest.fixture(scope="module")
def off_policy(tiny: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = off_policy_config()
    batch = make_batch(14, seed=2)
    got: dict[str, Any] = {}
    group = LearnerGroup(cfg, tiny)
    try:
        got["old"] = group.compute_logprobs(batch)
        got["m"] = group.update(with_behaviour(batch, got["old"]), got["old"])
        got["w"] = ray.get(group.publish_weights()[1])
    finally:
        group.shutdown()
    model = load_model(tiny)
    want: dict[str, Any] = {"norms": reference_run(cfg, model, behaviour=True)}
    want["w"] = {k: v.clone() for k, v in model.state_dict().items()}
    want["old"] = reference_logprobs(load_model(tiny), batch, cfg.rollout.temperature)
    return got, want


def test_decoupled_update_equals_a_single_process_update(off_policy) -> None:
    got, want = off_policy
    torch.testing.assert_close(got["old"], want["old"], atol=1e-5, rtol=0)
    assert got["m"]["num_optimizer_steps"] == 2.0
    assert got["m"]["grad_norm"] == pytest.approx(sum(want["norms"]) / 2, rel=1e-5)
    assert_weights_close(got["w"], want["w"])


def test_the_importance_weights_are_reported(off_policy) -> None:
    """Means over the micro-batches: some tokens truncated, none above the cap."""
    m = off_policy[0]["m"]
    assert 0.1 < m["behaviour_truncated_fraction"] < 0.6
    assert 1 / 2.8 < m["behaviour_imp_weight"] < IMP_CAP


def test_the_weights_and_their_cap_change_the_update(off_policy, tiny) -> None:
    """Not a no-op: the on-policy loss, and the decoupled loss at the default cap, end
    elsewhere than the learner did."""
    got, _ = off_policy
    on_policy = load_model(tiny)
    reference_run(off_policy_config(), on_policy, behaviour=False)
    assert max_weight_diff(on_policy.state_dict(), got["w"]) > 1e-4
    default_cap = load_model(tiny)
    reference_run(off_policy_config(cap=5.0), default_cap, behaviour=True)
    assert max_weight_diff(default_cap.state_dict(), got["w"]) > 1e-4
