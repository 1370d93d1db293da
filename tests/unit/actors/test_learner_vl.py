"""The learner on a vision-language model: 2 FSDP2 ranks (gloo, CPU) on the tiny Qwen2.5-VL
with a frozen vision tower, against a single-process reference.

The batch holds K12 prompts with their diagrams and one text-only pair, cut so that one rank
runs a micro-batch without any image and the other a padding micro-batch: both must still
run the vision tower (its FSDP2 blocks all-gather in every forward), which the learner's
vision filler does. Without it (tried) a rank aborts in gloo: "Received data size doesn't
match expected size. Is there a distributed collective mismatch". The reference is a plain
transformers model in one process, torch AdamW, the same loss, fed the processor's pixels.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

from actors.learner import LearnerGroup
from shuffle_r1.config import Config
from shuffle_r1.data import ImageSpec, load_examples, render_prompt, vision_inputs
from shuffle_r1.data.images import expand_image_tokens
from shuffle_r1.integrity import file_digests
from shuffle_r1.models import load_policy_model
from shuffle_r1.processor import load_processor
from shuffle_r1.training import TrainBatch, collate, token_logprobs
from tests.unit.actors.learner_reference import reference_update

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

K12 = Path(__file__).resolve().parents[3] / "data" / "k12" / "k12.json"
SPEC = ImageSpec(min_pixels=56 * 56, max_pixels=112 * 112)
WEIGHT_ATOL = 1e-5  # as tests/unit/actors/test_learner.py: 1% of lr


def make_config(model_path: Path) -> Config:
    cfg = Config()
    le = cfg.learner
    le.model_path, le.num_ranks, le.dtype = str(model_path), 2, "float32"
    le.lr, le.weight_decay, le.grad_clip = 1e-3, 0.01, 1.0
    le.micro_batch_size, le.global_batch_size = 2, 2  # 2 · 2·floor(0.5·4/2) = 4 per step
    le.freeze_vision_tower = True
    cfg.rollout.n, cfg.rollout.temperature = 4, 0.9
    cfg.rollout.dtype = "float32"  # weights are published in it: compared as float32
    cfg.algorithm.keep_ratio = 0.5
    return cfg


def make_batch(processor: Any) -> TrainBatch:
    """6 rollouts (3 pairs): two image pairs, then a text-only pair. Mini-batches of 4 and 2
    rollouts on 2 ranks: first one image pair per rank, then the text pair on rank 0 and a
    padding micro-batch on rank 1 (both without an image: the vision filler's two cases)."""
    examples = load_examples(
        K12, problem_key="question", image_key="image_path", id_key="id", image_spec=SPEC, limit=2
    ).examples
    gen = torch.Generator().manual_seed(0)
    prompts, images = [], []
    for e in examples:
        blobs = tuple(bytes(i) for i in e.images)
        text = expand_image_tokens(
            render_prompt(processor, e), blobs, processor.image_processor, "<|image_pad|>"
        )
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts += [ids, ids]
        images += [blobs, blobs]
    prompts += [[1, 2, 3, 4], [1, 2, 3, 4]]
    images += [(), ()]
    responses = [
        torch.randint(49152, (int(n),), generator=gen).tolist() for n in (5, 3, 4, 6, 2, 5)
    ]
    high = torch.rand(3, generator=gen) + 0.2
    return TrainBatch(
        prompts, responses, torch.stack([high, -high + 0.1], 1).flatten(), images=images
    )


def reference_logprobs(model, processor, batch: TrainBatch, temperature: float) -> torch.Tensor:
    c = collate(batch)
    vision = None
    if batch.has_images:
        vision = vision_inputs(
            batch.images, c["input_ids"], processor.image_processor, processor.image_token_id
        )
    return token_logprobs(
        model,
        c["input_ids"],
        c["attention_mask"],
        None if vision else c["position_ids"],
        c["response_start"],
        c["response_mask"],
        temperature,
        vision=vision,
    )


@pytest.fixture(scope="module")
def scenario(tiny_vl, tmp_path_factory) -> dict[str, Any]:
    processor = load_processor(tiny_vl)
    cfg = make_config(tiny_vl)
    batch = make_batch(processor)
    ckpt = tmp_path_factory.mktemp("vl-checkpoint")
    r: dict[str, Any] = {"processor": processor, "batch": batch, "cfg": cfg, "ckpt": ckpt}
    group = LearnerGroup(cfg, tiny_vl)
    try:
        r["w0"] = ray.get(group.publish_weights()[1])
        r["logp0"] = group.compute_logprobs(batch)
        r["m1"] = group.update(batch, r["logp0"])
        r["w1"] = ray.get(group.publish_weights()[1])
        group.save_checkpoint(ckpt)
        r["logp1"] = group.compute_logprobs(batch)
        group.update(batch, r["logp1"])
        group.load_checkpoint(ckpt, file_digests(ckpt))  # as a verified manifest lists it
        r["loaded_version"] = group.version
        r["logp1_loaded"] = group.compute_logprobs(batch)
    finally:
        group.shutdown()
    model = load_policy_model(tiny_vl, dtype=torch.float32).eval()
    frozen = [n for n, p in model.named_parameters() if n.startswith("model.visual.")]
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.learner.lr,
        weight_decay=cfg.learner.weight_decay,
    )
    with torch.no_grad():
        r["ref_logp0"] = reference_logprobs(model, processor, batch, cfg.rollout.temperature)
    logprobs = partial(reference_logprobs, model, processor, temperature=cfg.rollout.temperature)
    r["ref_norms"] = reference_update(model, optimizer, batch, r["ref_logp0"], cfg, logprobs)
    r["ref_w1"] = {k: v.clone() for k, v in model.state_dict().items()}
    r["frozen"] = frozen
    return r


def test_logprobs_of_image_prompts_equal_a_single_process_model(scenario) -> None:
    batch = scenario["batch"]
    assert scenario["logp0"].shape == (6, batch.max_response_len)
    torch.testing.assert_close(scenario["logp0"], scenario["ref_logp0"], atol=1e-5, rtol=0)


def test_two_ranks_with_a_frozen_vision_tower_update_as_one_process(scenario) -> None:
    m1 = scenario["m1"]
    assert m1["num_optimizer_steps"] == 2  # mini-batches of 4 and 2 rollouts
    assert m1["grad_norm"] == pytest.approx(sum(scenario["ref_norms"]) / 2, rel=1e-5)
    torch.testing.assert_close(scenario["w1"], scenario["ref_w1"], atol=WEIGHT_ATOL, rtol=0)


def test_the_frozen_vision_tower_does_not_move_and_the_rest_does(scenario) -> None:
    w0, w1, frozen = scenario["w0"], scenario["w1"], scenario["frozen"]
    assert len(frozen) > 10 and all(k in w1 for k in frozen)
    assert all(torch.equal(w0[k], w1[k]) for k in frozen)
    moved = [k for k in w1 if k not in frozen and not torch.equal(w0[k], w1[k])]
    assert "model.language_model.layers.0.mlp.up_proj.weight" in moved
    assert (
        "lm_head.weight" in w1
        and w1["lm_head.weight"] is w1["model.language_model.embed_tokens.weight"]
    )


def test_checkpoint_of_a_vl_model_restores_model_and_optimizer(scenario) -> None:
    ckpt = scenario["ckpt"]
    assert scenario["loaded_version"] == 1
    torch.testing.assert_close(scenario["logp1_loaded"], scenario["logp1"], atol=1e-6, rtol=0)
    # the checkpoint folder is a complete VL model folder: weights, processor, template
    saved = load_policy_model(ckpt / "model", dtype=torch.float32).state_dict()
    torch.testing.assert_close(saved, scenario["w1"], atol=0, rtol=0)
    assert load_processor(ckpt / "model").image_token_id == scenario["processor"].image_token_id
