"""The KL loss to a reference policy and LoRA, on a real Ray: 2 FSDP2 ranks (gloo, CPU) on
the tiny random Llama, each against a single-process reference that shares no code with the
sharding (issue #19 item 4).

- KL (``k1``; ``low_var_kl`` in the LoRA scenario): the ranks' reference log-probs are the
  initial model's, before and after updates; two updates with ``kl_coef > 0`` move the
  weights exactly as a plain transformers model, a frozen copy of it and torch AdamW do.
- LoRA: two updates of rank-4 adapters with a KL loss (whose reference is the policy with its
  adapters off); the published weights equal peft's own ``merge_and_unload`` of the
  single-process model, carry the base model's names, and a fresh plain model loaded from
  them (what a rollout engine loads) gives the adapted policy's log-probs; a checkpoint's
  ``model/`` is that merged model, and a new group resumes from its adapters exactly.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import pytest
import ray
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from actors.learner import LearnerGroup
from shuffle_r1.config import Config
from shuffle_r1.integrity import file_digests
from shuffle_r1.lora import ADAPTER_FILE
from shuffle_r1.models import build_tiny_llama
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

KL_COEF = 0.5  # large, so the KL term's share of the gradient is not lost in rounding


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", seed=0)


def kl_config(kl_type: str, lora_rank: int = 0) -> Config:
    cfg = make_config()
    cfg.algorithm.kl_coef, cfg.algorithm.kl_type = KL_COEF, kl_type
    le = cfg.learner
    le.lora_rank, le.lora_alpha, le.lora_target_modules = lora_rank, 8, ["q_proj", "v_proj"]
    return cfg


def run_group(cfg: Config, model_path: Any, checkpoint: Any = None) -> dict[str, Any]:
    """Two updates with reference log-probs, as the trainer's step makes them."""
    batch1, batch2 = make_batch(8, seed=1), make_batch(14, seed=2)
    r: dict[str, Any] = {}
    group = LearnerGroup(cfg, model_path)
    try:
        r["ref0"] = group.compute_logprobs(batch1, reference=True)
        r["m1"] = group.update(batch1.with_logprobs(ref=r["ref0"]), None)
        r["ref1"] = group.compute_logprobs(batch2, reference=True)
        r["logp1"] = group.compute_logprobs(batch2)
        if checkpoint is not None:
            group.save_checkpoint(checkpoint)
        r["m2"] = group.update(batch2.with_logprobs(ref=r["ref1"]), r["logp1"])
        r["w2"] = ray.get(group.publish_weights()[1])
        r["logp2"] = group.compute_logprobs(batch2)
    finally:
        group.shutdown()
    return r


def reference_run(cfg: Config, model: torch.nn.Module, ref_logp: Any) -> dict[str, Any]:
    """The same two updates in one process; ``ref_logp(batch)`` gives reference log-probs."""
    batch1, batch2 = make_batch(8, seed=1), make_batch(14, seed=2)
    t = cfg.rollout.temperature
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learner.lr, weight_decay=0.01)
    grad_logprobs = partial(text_logprobs, model, temperature=t)
    out: dict[str, Any] = {"ref0": ref_logp(batch1)}
    logp0 = reference_logprobs(model, batch1, t)
    batch1 = batch1.with_logprobs(ref=out["ref0"])
    out["norms1"] = reference_update(model, optimizer, batch1, logp0, cfg, grad_logprobs)
    out["ref1"] = ref_logp(batch2)
    out["logp1"] = reference_logprobs(model, batch2, t)
    batch2 = batch2.with_logprobs(ref=out["ref1"])
    out["norms2"] = reference_update(model, optimizer, batch2, out["logp1"], cfg, grad_logprobs)
    out["logp2"] = reference_logprobs(model, make_batch(14, seed=2), t)
    return out


@pytest.fixture(scope="module")
def kl(tiny: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """k1, whose gradient is not 0 where the policy equals its reference (low_var_kl's is:
    the LoRA scenario below runs it from the second update on)."""
    cfg = kl_config("k1")
    got = run_group(cfg, tiny)
    model, frozen = load_model(tiny), load_model(tiny)
    t = cfg.rollout.temperature
    want = reference_run(cfg, model, lambda b: reference_logprobs(frozen, b, t))
    want["w2"] = {k: v.clone() for k, v in model.state_dict().items()}
    want["initial"] = frozen.state_dict()
    return got, want


def test_reference_logprobs_are_the_initial_models_after_updates(kl) -> None:
    got, want = kl
    torch.testing.assert_close(got["ref0"], want["ref0"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["ref1"], want["ref1"], atol=1e-5, rtol=0)
    # after the first update the policy moved away from its reference
    assert float((got["logp1"] - got["ref1"]).abs().max()) > 1e-3


def test_kl_loss_updates_equal_a_single_process_update(kl) -> None:
    got, want = kl
    assert got["m1"]["grad_norm"] == pytest.approx(want["norms1"][0], rel=1e-5)
    assert got["m2"]["grad_norm"] == pytest.approx(sum(want["norms2"]) / 2, rel=1e-5)
    assert_weights_close(got["w2"], want["w2"])
    # the KL is reported, and is what the loss adds to the surrogate
    m2 = got["m2"]
    assert m2["kl"] != 0.0
    assert m2["policy_loss"] == pytest.approx(m2["pg_loss"] + KL_COEF * m2["kl"], abs=1e-6)


def test_kl_loss_changes_the_update(kl, tiny) -> None:
    """Not a no-op: the same two updates without the KL term end elsewhere."""
    _, want = kl
    cfg = make_config()
    model, frozen = load_model(tiny), load_model(tiny)
    reference_run(cfg, model, lambda b: reference_logprobs(frozen, b, cfg.rollout.temperature))
    assert max_weight_diff(model.state_dict(), want["w2"]) > 1e-4


@pytest.fixture(scope="module")
def lora(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cfg = kl_config("low_var_kl", lora_rank=4)
    checkpoint = tmp_path_factory.mktemp("lora-checkpoint")
    got = run_group(cfg, tiny, checkpoint)
    resumed: dict[str, Any] = {}
    group = LearnerGroup(cfg, tiny)
    try:
        group.load_checkpoint(checkpoint, file_digests(checkpoint))
        batch2 = make_batch(14, seed=2)
        resumed["logp1"] = group.compute_logprobs(batch2)
        resumed["ref1"] = group.compute_logprobs(batch2, reference=True)
    finally:
        group.shutdown()

    torch.manual_seed(cfg.trainer.seed)  # as every rank seeds its adapters
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(load_model(tiny), config)
    t = cfg.rollout.temperature

    def adapters_off(batch: Any) -> torch.Tensor:
        with peft_model.disable_adapter():
            return reference_logprobs(peft_model, batch, t)

    want = reference_run(cfg, peft_model, adapters_off)
    want["merged"] = peft_model.merge_and_unload().state_dict()
    return {"got": got, "want": want, "resumed": resumed, "checkpoint": checkpoint, "tiny": tiny}


def test_lora_updates_equal_a_single_process_peft_model(lora) -> None:
    got, want = lora["got"], lora["want"]
    torch.testing.assert_close(got["ref0"], want["ref0"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["ref1"], want["ref1"], atol=1e-5, rtol=0)
    assert got["m1"]["grad_norm"] == pytest.approx(want["norms1"][0], rel=1e-5)
    assert got["m2"]["grad_norm"] == pytest.approx(sum(want["norms2"]) / 2, rel=1e-5)
    torch.testing.assert_close(got["logp2"], want["logp2"], atol=1e-5, rtol=0)


def test_published_lora_weights_are_the_merged_model(lora) -> None:
    """What the rollout workers get: peft's merge of the adapters, under the base model's
    names; a plain model loaded from it computes the adapted policy's log-probs."""
    got, want = lora["got"], lora["want"]
    base = load_model(lora["tiny"]).state_dict()
    assert got["w2"].keys() == base.keys()
    torch.testing.assert_close(got["w2"], want["merged"], atol=1e-6, rtol=0)
    changed = {k for k in base if not torch.equal(base[k], got["w2"][k])}
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed), changed
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(lora["tiny"])).eval()
    fresh.load_state_dict(got["w2"], strict=True)
    t = make_config().rollout.temperature
    torch.testing.assert_close(
        reference_logprobs(fresh, make_batch(14, seed=2), t), got["logp2"], atol=1e-5, rtol=0
    )


def test_lora_checkpoint_is_a_merged_model_and_resumes_exactly(lora) -> None:
    checkpoint, got = lora["checkpoint"], lora["got"]
    assert (checkpoint / ADAPTER_FILE).is_file()
    plain = load_model(checkpoint / "model")  # loads as a plain model, no peft
    t = make_config().rollout.temperature
    torch.testing.assert_close(
        reference_logprobs(plain, make_batch(14, seed=2), t), got["logp1"], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(lora["resumed"]["logp1"], got["logp1"], atol=1e-6, rtol=0)
    torch.testing.assert_close(lora["resumed"]["ref1"], got["ref1"], atol=1e-6, rtol=0)
