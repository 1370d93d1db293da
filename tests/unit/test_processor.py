"""The multimodal processor and the tiny Qwen2.5-VL model: placeholders in the rendered prompt,
image tokens that match the pixel grid, the 3-D mRoPE forward, built without torchvision."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from shuffle_r1.data import (
    ImageSpec,
    decode_images,
    load_examples,
    render_prompt,
    vision_inputs,
)
from shuffle_r1.data.images import expand_image_tokens
from shuffle_r1.models import is_vision_language, load_policy_model
from shuffle_r1.processor import QWEN2_5_VL_SPECIAL_TOKENS, load_processor
from shuffle_r1.training import TrainBatch, collate, token_logprobs

K12 = Path(__file__).resolve().parents[2] / "data" / "k12" / "k12.json"
SPEC = ImageSpec(min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def processor(tiny_vl):
    return load_processor(tiny_vl)


@pytest.fixture(scope="module")
def k12():
    return load_examples(
        K12, problem_key="question", image_key="image_path", id_key="id", image_spec=SPEC, limit=6
    ).examples


def test_builds_and_loads_without_torchvision(tiny_vl, processor) -> None:
    assert importlib.util.find_spec("torchvision") is None
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    assert is_vision_language(tiny_vl)
    config = AutoConfig.from_pretrained(tiny_vl)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == config.text_config.vocab_size == 49152 + 11
    ids = tokenizer.convert_tokens_to_ids(list(QWEN2_5_VL_SPECIAL_TOKENS))
    assert ids == list(range(49152, 49163))  # one id each, appended to SmolLM2's vocabulary
    assert config.image_token_id == processor.image_token_id == ids[9]
    assert (config.vision_start_token_id, config.vision_end_token_id) == (ids[6], ids[7])
    # the layout of the Qwen2.5-VL releases, so AutoProcessor reads it where torchvision is
    meta = json.loads((tiny_vl / "preprocessor_config.json").read_text())
    assert meta["processor_class"] == "Qwen2_5_VLProcessor"


def test_prompt_has_the_image_placeholder_between_instruction_and_problem(processor, k12):
    example = k12[0]
    prompt = render_prompt(processor, example)
    start = prompt.index("<|im_start|>user\n")
    image = prompt.index("<|vision_start|><|image_pad|><|vision_end|>")
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert start < prompt.index("You FIRST think") < image < prompt.index(example.problem)
    assert prompt.count("<|image_pad|>") == 1
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_expanded_tokens_match_the_processor_and_the_pixel_grid(processor, k12) -> None:
    for example in k12:
        text = render_prompt(processor, example)
        images = [bytes(i) for i in example.images]
        expanded = processor.tokenizer(
            expand_image_tokens(text, images, processor.image_processor, processor.image_token),
            add_special_tokens=False,
        )["input_ids"]
        reference = processor(
            text=[text],
            images=decode_images(images),
            do_resize=False,
            add_special_tokens=False,
        )
        assert expanded == reference["input_ids"][0]
        # the count is the grid: (h/14)(w/14)/4 tokens, between 4 (56²) and 16 (112²) here
        ids = torch.tensor([expanded])
        vision = vision_inputs([images], ids, processor.image_processor, processor.image_token_id)
        t, h, w = vision["image_grid_thw"][0].tolist()
        count = int(vision["mm_token_type_ids"].sum())
        assert t == 1 and count == h * w // 4 and 4 <= count <= 16
        assert vision["pixel_values"].shape == (h * w, 3 * 2 * 14 * 14)


def test_token_count_mismatch_names_the_row(processor, k12) -> None:
    images = [bytes(k12[0].images[0])]
    ids = torch.tensor([[1, processor.image_token_id, 2]])  # one token: too few for the grid
    with pytest.raises(ValueError, match=r"row 0: the prompt holds 1 image tokens but"):
        vision_inputs([images], ids, processor.image_processor, processor.image_token_id)
    with pytest.raises(ValueError, match="placeholder"):
        expand_image_tokens("no placeholder", images, processor.image_processor, "<|image_pad|>")


def test_vl_forward_needs_its_own_mrope_positions_and_keeps_logits(tiny_vl, processor, k12):
    """token_logprobs on the VL model: logits_to_keep gives the full forward's values, and
    the model's 3-D mRoPE positions (position_ids=None) differ from 0..T-1."""
    model = load_policy_model(tiny_vl, dtype=torch.float32).eval()
    rows = []
    for example in k12[:2]:
        text = render_prompt(processor, example)
        images = tuple(bytes(i) for i in example.images)
        text = expand_image_tokens(text, images, processor.image_processor, processor.image_token)
        rows.append((processor.tokenizer(text, add_special_tokens=False)["input_ids"], images))
    batch = TrainBatch(
        prompt_token_ids=[p for p, _ in rows],
        response_token_ids=[[40, 41, 42], [43, 44]],
        advantages=torch.zeros(2),
        images=[i for _, i in rows],
    )
    c = collate(batch)
    vision = vision_inputs(
        batch.images, c["input_ids"], processor.image_processor, processor.image_token_id
    )
    args = (c["input_ids"], c["attention_mask"])
    tail = (c["response_start"], c["response_mask"])
    with torch.no_grad():
        own = token_logprobs(model, *args, None, *tail, vision=vision)
        linear = token_logprobs(model, *args, c["position_ids"], *tail, vision=vision)
        logits = model(input_ids=c["input_ids"], attention_mask=c["attention_mask"], **vision)
        full = torch.log_softmax(logits.logits, -1)  # (B, T, V): no logits_to_keep
    expected = torch.stack(
        [
            torch.cat(
                [full[i, c["response_start"][i] - 1 + j, t].view(1) for j, t in enumerate(r)]
                + [torch.zeros(3 - len(r))]
            )
            for i, r in enumerate(batch.response_token_ids)
        ]
    )
    torch.testing.assert_close(own, expected, atol=1e-5, rtol=0)
    assert (own - linear).abs().max() > 1e-4
