"""The transformers engine on image prompts: the tiny Qwen2.5-VL model, real K12 diagrams.

The images reach the model (another image changes the completions of the same seeded
request), the log-probs are those of a plain forward with the same pixels, and a prompt
whose images do not fit fails with the request named.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from actors.rollout import GenerationRequest, HFEngine, SamplingSpec, make_engine
from shuffle_r1.config import RolloutConfig
from shuffle_r1.data import ImageSpec, load_examples, render_prompt, vision_inputs
from shuffle_r1.data.images import expand_image_tokens
from shuffle_r1.models import build_tiny_llama
from shuffle_r1.processor import load_processor

K12 = Path(__file__).resolve().parents[3] / "data" / "k12" / "k12.json"
SPEC = ImageSpec(min_pixels=56 * 56, max_pixels=112 * 112)
HF = RolloutConfig(engine="hf", threads_per_worker=1, dtype="float32")


@pytest.fixture(scope="module")
def processor(tiny_vl):
    return load_processor(tiny_vl)


@pytest.fixture(scope="module")
def engine(tiny_vl):
    return HFEngine(tiny_vl, HF, seed=0)


def request(processor, example, request_id, images=None):
    """A rollout request as the trainer builds it: the prompt with expanded image tokens."""
    images = tuple(bytes(i) for i in example.images) if images is None else images
    text = expand_image_tokens(
        render_prompt(processor, example), images, processor.image_processor, "<|image_pad|>"
    )
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    return GenerationRequest(request_id, ids, images)


@pytest.fixture(scope="module")
def k12_requests(processor):
    examples = load_examples(
        K12, problem_key="question", image_key="image_path", id_key="id", image_spec=SPEC, limit=3
    ).examples
    return [request(processor, e, f"r{i}") for i, e in enumerate(examples)], examples


def test_image_requests_give_n_completions_and_count_their_images(engine, k12_requests):
    reqs, _ = k12_requests
    out = engine.generate(reqs, SamplingSpec(n=3, temperature=1.0, top_p=1.0, max_tokens=6, seed=0))
    assert [(c.request_id, c.index) for c in out] == [
        (r.request_id, i) for r in reqs for i in range(3)
    ]
    assert all(c.images == 1 and len(c.token_ids) == len(c.logprobs) == 6 for c in out)
    text = engine.generate(
        [GenerationRequest("t", reqs[0].prompt_token_ids[:5])], SamplingSpec(1, 1.0, 1.0, 2)
    )
    assert text[0].images == 0


def test_logprobs_are_a_plain_forward_with_the_same_pixels(engine, processor, k12_requests):
    reqs, _ = k12_requests
    temperature = 0.8
    out = engine.generate(
        reqs[:2], SamplingSpec(n=2, temperature=temperature, top_p=1.0, max_tokens=5, seed=3)
    )
    for c in out:
        r = next(r for r in reqs if r.request_id == c.request_id)
        ids = torch.tensor([r.prompt_token_ids + c.token_ids])
        vision = vision_inputs([r.images], ids, processor.image_processor, processor.image_token_id)
        with torch.no_grad():
            logits = engine.model(input_ids=ids, **vision).logits[
                0, len(r.prompt_token_ids) - 1 : -1
            ]
        expected = torch.log_softmax(logits.float() / temperature, -1).gather(
            1, torch.tensor(c.token_ids)[:, None]
        )
        torch.testing.assert_close(torch.tensor(c.logprobs), expected.squeeze(1), atol=1e-4, rtol=0)


def test_another_image_changes_the_completions_of_the_same_seeded_request(
    engine, processor, k12_requests
):
    reqs, examples = k12_requests
    spec = SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=8, seed=5)
    flipped = Image.open(io.BytesIO(reqs[0].images[0])).transpose(Image.Transpose.ROTATE_180)
    png = io.BytesIO()
    flipped.save(png, format="PNG")
    other = request(processor, examples[0], "r0", images=(png.getvalue(),))
    assert other.prompt_token_ids == reqs[0].prompt_token_ids  # same grid, same tokens
    again = engine.generate([reqs[0]], spec)
    changed = engine.generate([other], spec)
    assert engine.generate([reqs[0]], spec) == again  # seeded: only the image differs
    assert [c.logprobs for c in changed] != [c.logprobs for c in again]


def test_bad_image_requests_fail_naming_the_request(engine, tmp_path, k12_requests):
    reqs, _ = k12_requests
    spec = SamplingSpec(1, 1.0, 1.0, 2)
    short = GenerationRequest("few-tokens", reqs[0].prompt_token_ids[:40], reqs[0].images)
    with pytest.raises(ValueError, match=r"request 'few-tokens': row 0: the prompt holds"):
        engine.generate([short], spec)
    text_model = HFEngine(build_tiny_llama(tmp_path / "tiny"), HF, seed=0)
    with pytest.raises(
        ValueError, match=r"request 'r0' has 1 image\(s\) but the model is text-only"
    ):
        text_model.generate([reqs[0]], spec)


@pytest.mark.slow
def test_vllm_engine_falls_back_to_transformers_for_vl_models_without_torchvision(tiny_vl, caplog):
    pytest.importorskip("vllm")
    with caplog.at_level(logging.WARNING, logger="actors.rollout.engines"):
        engine = make_engine(
            tiny_vl, RolloutConfig(engine="vllm", threads_per_worker=1, dtype="float32"), 0
        )
    assert engine.name == "hf"
    assert "torchvision is not installed" in caplog.text
