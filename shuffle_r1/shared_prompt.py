"""Response log-probs with each distinct prompt of a micro-batch computed once (#17 item 2).

GRPO trains on several rollouts of every prompt (n per group; PTS keeps pairs of one group,
ABS repeats pairs), and :func:`shuffle_r1.training.token_logprobs` runs every row's prompt
through the model again. A causal model's states at the prompt positions depend on the
prompt alone, so here the micro-batch's distinct prompts run once (left-padded, ``(G, P)``)
with the KV cache kept, each rollout's keys and values are taken from its prompt's
(``index_select``: gradients flow back to the one prompt pass), and the responses run as a
continuation ``(B, R)`` at positions ``len(prompt) + j``. The log-prob of response token 0
comes from the prompt pass's last position, the others from the continuation's. Same
values as the full rows up to float rounding (``tests/unit/test_shared_prompt.py``), with
``G·P + B·R`` positions instead of ``B·(P + R)``: for the main job (88 prompt and ~42 response
tokens, 2-4 rollouts of a prompt per micro-batch) a third to a half of the learner's FLOPs.

Text models only: a vision-language prompt's image features and mRoPE positions are the
model's own business (the learner keeps :func:`~shuffle_r1.training.token_logprobs` there).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from shuffle_r1.training import TrainBatch, loss_inputs


def collate_shared(batch: TrainBatch, pad_token_id: int = 0) -> dict[str, Tensor]:
    """The micro-batch as distinct prompts and per-rollout responses.

    Returns:
        ``prompt_ids`` / ``prompt_mask`` ``(G, P)`` long, the G distinct prompts (in first
        appearance order) left-padded, 1 on real tokens; ``prompt_of`` ``(B,)`` long, each
        rollout's prompt; ``response_ids`` ``(B, L)`` long right-padded, ``L = max(1, longest
        response)``; and as :func:`~shuffle_r1.training.collate`: ``response_mask`` ``(B, L)``
        float, ``advantages`` ``(B,)``, ``old_logprobs`` / ``ref_logprobs`` /
        ``behaviour_logprobs`` ``(B, L)`` when the batch has them.

    Raises:
        ValueError: the batch is empty.
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch; use padding_batch() for a filler row")
    index: dict[tuple[int, ...], int] = {}
    prompt_of = [index.setdefault(tuple(p), len(index)) for p in batch.prompt_token_ids]
    prompts = list(index)
    width_p = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), width_p), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(prompts), width_p), dtype=torch.long)
    for g, prompt in enumerate(prompts):
        prompt_ids[g, width_p - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        prompt_mask[g, width_p - len(prompt) :] = 1
    width = max(1, max(len(r) for r in batch.response_token_ids))
    response_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(batch), width), dtype=torch.float32)
    for i, response in enumerate(batch.response_token_ids):
        response_ids[i, : len(response)] = torch.tensor(response, dtype=torch.long)
        response_mask[i, : len(response)] = 1.0
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "prompt_of": torch.tensor(prompt_of, dtype=torch.long),
        "response_ids": response_ids,
        **loss_inputs(batch, response_mask),
    }


def shared_prompt_logprobs(
    model: nn.Module, inputs: dict[str, Tensor], temperature: float = 1.0
) -> Tensor:
    """Log-probs (nats) of the response tokens, ``log_softmax(logits / T)`` at each, from
    :func:`collate_shared`'s inputs (on the model's device): the prompt pass, then the
    responses as its continuation (module doc). Two forward calls of ``model``, on every
    rank alike (FSDP2 gathers the parameters for each).

    Args:
        model: a transformers causal LM (``*ForCausalLM``: ``past_key_values``,
            ``position_ids``, ``cache_position``, ``logits_to_keep``), possibly FSDP-wrapped.
        inputs: :func:`collate_shared`'s tensors.
        temperature: the rollout temperature, > 0.

    Returns:
        ``(B, L)`` float32, 0 where ``response_mask`` is 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    prompt_mask, prompt_of = inputs["prompt_mask"], inputs["prompt_of"]
    response_ids, response_mask = inputs["response_ids"], inputs["response_mask"]
    width_p, width = prompt_mask.shape[1], response_ids.shape[1]
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)  # left padding: real tokens at 0..
    first: Any = model(
        input_ids=inputs["prompt_ids"],
        attention_mask=prompt_mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,  # the last prompt position predicts response token 0
    )
    layers = [
        (layer.keys.index_select(0, prompt_of), layer.values.index_select(0, prompt_of))
        for layer in first.past_key_values.layers
    ]
    from transformers import DynamicCache

    cache = DynamicCache(ddp_cache_data=layers, config=_config(model))
    lengths = prompt_mask.sum(1)[prompt_of]
    device = response_ids.device
    rest: Any = model(
        input_ids=response_ids,
        attention_mask=torch.cat([prompt_mask[prompt_of], response_mask.long()], dim=1),
        position_ids=lengths.unsqueeze(1) + torch.arange(width, device=device),
        past_key_values=cache,
        cache_position=torch.arange(width_p, width_p + width, device=device),
        use_cache=True,
        logits_to_keep=width,
    )
    logits = torch.cat([first.logits[prompt_of], rest.logits[:, :-1]], dim=1).float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return torch.where(response_mask.bool(), picked, torch.zeros_like(picked))


def _config(model: nn.Module) -> Any:
    """The transformers config of ``model``, through a DeepSpeed engine's ``module`` (whose
    own ``config`` is DeepSpeed's dict)."""
    return getattr(model, "module", model).config
