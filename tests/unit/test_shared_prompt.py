"""shuffle_r1.shared_prompt: each distinct prompt of a micro-batch runs once, and the response
log-probs and their gradients are those of the full rows (training.token_logprobs)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from shuffle_r1.shared_prompt import collate_shared, shared_prompt_logprobs
from shuffle_r1.training import TrainBatch, collate, padding_batch, token_logprobs


def tiny_model() -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def grouped_batch() -> TrainBatch:
    """3 prompts of 3, 7 and 5 tokens with 4, 1 and 2 rollouts, interleaved as ABS serves
    them; responses of 0 to 6 tokens (an empty one included)."""
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 128, (n,), generator=gen).tolist() for n in (3, 7, 5)]
    owners = [0, 0, 1, 2, 0, 2, 0]
    lengths = [4, 6, 0, 3, 1, 6, 2]
    return TrainBatch(
        prompt_token_ids=[prompts[g] for g in owners],
        response_token_ids=[torch.randint(1, 128, (n,), generator=gen).tolist() for n in lengths],
        advantages=torch.linspace(-1, 1, len(owners)),
        old_logprobs=-torch.rand(len(owners), 6, generator=gen),
    )


def full_rows(model: LlamaForCausalLM, batch: TrainBatch, temperature: float) -> torch.Tensor:
    c = collate(batch)
    return token_logprobs(
        model, c["input_ids"], c["attention_mask"], c["position_ids"], c["response_start"],
        c["response_mask"], temperature,
    )  # fmt: skip


def test_collate_shared_keeps_each_prompt_once_left_padded() -> None:
    batch = grouped_batch()
    c = collate_shared(batch)
    assert c["prompt_ids"].shape == (3, 7) and c["prompt_of"].tolist() == [0, 0, 1, 2, 0, 2, 0]
    assert c["prompt_mask"].sum(1).tolist() == [3, 7, 5]
    assert c["prompt_ids"][0, 4:].tolist() == batch.prompt_token_ids[0]  # left padding
    full = collate(batch)
    for key in ("response_mask", "advantages", "old_logprobs"):
        torch.testing.assert_close(c[key], full[key], atol=0, rtol=0)
    with pytest.raises(ValueError, match="empty batch"):
        collate_shared(batch.select(slice(0, 0)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_log_probs_and_gradients_equal_the_full_rows(temperature: float) -> None:
    model, batch = tiny_model(), grouped_batch()
    weights = torch.randn(len(batch), 6, generator=torch.Generator().manual_seed(2))

    def run(fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad()
        logprobs = fn()
        (logprobs * weights).sum().backward()
        return logprobs.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want, want_grads = run(lambda: full_rows(model, batch, temperature))
    got, got_grads = run(lambda: shared_prompt_logprobs(model, collate_shared(batch), temperature))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got[2].abs().sum() == 0  # the empty response
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_padding_micro_batch_runs() -> None:
    logprobs = shared_prompt_logprobs(tiny_model(), collate_shared(padding_batch(2)))
    assert logprobs.shape == (2, 1) and logprobs.abs().sum() == 0
    with pytest.raises(ValueError, match="temperature"):
        shared_prompt_logprobs(tiny_model(), collate_shared(padding_batch()), 0.0)
