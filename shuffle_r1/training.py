"""The learner's batch layout and arithmetic, shared by every training backend (pure torch).

A training batch is a list of rollouts (prompt token ids + response token ids, and the
prompt's images for a multimodal model) with one advantage each, in the order the buffer
served them: both rollouts of a PTS pair are adjacent (docs/algorithm.md §3.4). This module

- collates rollouts into right-padded model inputs (:func:`collate`; their images go through
  ``shuffle_r1.data.images.vision_inputs``);
- computes the log-probs of the response tokens under a model (:func:`token_logprobs`);
- pads a rank's micro-batches with :func:`padding_batch` rows (how a batch is cut into
  mini-batches, shards and micro-batches is :mod:`shuffle_r1.minibatches`).

Log-probs, masks and old log-probs are ``(B, L)`` over response tokens: column ``j`` is
response token ``j`` of each rollout, ``L`` the longest response of the batch, the rest
padding (mask 0, value 0). That is the layout :func:`shuffle_r1.algos.policy_loss` takes.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

# The (B, L) per-token log-prob fields of a TrainBatch, which every row operation carries.
LOGPROB_FIELDS = ("old_logprobs", "ref_logprobs", "behaviour_logprobs")


@dataclass
class TrainBatch:
    """Rollouts to train on, in order; both rollouts of a pair adjacent.

    Attributes:
        prompt_token_ids: B lists of prompt token ids (at least one token each).
        response_token_ids: B lists of response token ids (may be empty: such a row has no
            response token, contributes nothing and serves as padding).
        advantages: ``(B,)`` float, one advantage per rollout (docs/algorithm.md §1).
        old_logprobs: optional ``(B, L)`` log-probs (nats) of the response tokens under the
            policy the batch was drawn with; ``L`` ≥ the longest response.
        ref_logprobs: optional ``(B, L)`` log-probs under the reference policy (KL loss).
        behaviour_logprobs: optional ``(B, L)`` log-probs the rollout engine sampled the
            response tokens with (the behaviour policy), for the decoupled loss of rollouts
            drawn by older weights (docs/algorithm.md §4, "Off-policy rollouts").
        images: B tuples of the prompts' images (``shuffle_r1.data.images`` PNG bytes, in
            prompt order; ``()`` for a text prompt), or ``[]`` for a text-only batch. A
            prompt's ``<|image_pad|>`` tokens are already expanded to its images' grids.
    """

    prompt_token_ids: list[list[int]]
    response_token_ids: list[list[int]]
    advantages: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
    behaviour_logprobs: Tensor | None = None
    images: list[tuple[bytes, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        b = len(self.prompt_token_ids)
        if len(self.response_token_ids) != b or tuple(self.advantages.shape) != (b,):
            raise ValueError(
                f"TrainBatch needs B prompts, B responses and advantages of shape (B,); got "
                f"{b} prompts, {len(self.response_token_ids)} responses, advantages of shape "
                f"{tuple(self.advantages.shape)}"
            )
        if self.images and len(self.images) != b:
            raise ValueError(
                f"TrainBatch.images must hold one tuple per rollout (B={b}) or be empty, "
                f"got {len(self.images)}"
            )
        empty = [i for i, p in enumerate(self.prompt_token_ids) if not p]
        if empty:
            raise ValueError(
                f"rollouts {empty[:5]} have an empty prompt; a prompt needs >= 1 token"
            )
        for name in LOGPROB_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if value.dim() != 2 or value.shape[0] != b or value.shape[1] < self.max_response_len:
                raise ValueError(
                    f"{name} must have shape (B={b}, L>={self.max_response_len}), "
                    f"got {tuple(value.shape)}"
                )

    def __len__(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def max_response_len(self) -> int:
        """Tokens in the longest response (0 for an empty batch)."""
        return max((len(r) for r in self.response_token_ids), default=0)

    def select(self, rows: slice | Sequence[int]) -> TrainBatch:
        """The rollouts ``rows`` (a slice, or a list of rollout indices in the order wanted)
        as a new batch."""
        if isinstance(rows, slice):
            return TrainBatch(
                prompt_token_ids=self.prompt_token_ids[rows],
                response_token_ids=self.response_token_ids[rows],
                advantages=self.advantages[rows],
                images=self.images[rows],
                **self._logprob_rows(rows),
            )
        index = torch.tensor(list(rows), dtype=torch.long)
        return TrainBatch(
            prompt_token_ids=[self.prompt_token_ids[i] for i in rows],
            response_token_ids=[self.response_token_ids[i] for i in rows],
            advantages=self.advantages[index],
            images=[self.images[i] for i in rows] if self.images else [],
            **self._logprob_rows(index),
        )

    def _logprob_rows(self, rows: slice | Tensor) -> dict[str, Tensor | None]:
        """The rows ``rows`` of each :data:`LOGPROB_FIELDS` field (None stays None)."""
        fields = {name: getattr(self, name) for name in LOGPROB_FIELDS}
        return {name: None if value is None else value[rows] for name, value in fields.items()}

    @property
    def has_images(self) -> bool:
        """Whether any rollout's prompt has an image."""
        return any(self.images)

    def concat(self, other: TrainBatch) -> TrainBatch:
        """This batch's rollouts followed by ``other``'s. Log-probs are kept only when both
        have them (widths padded with 0 to the wider)."""

        def cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            if a is None or b is None:
                return None
            width = max(a.shape[1], b.shape[1])
            return torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in (a, b)])

        images = self.images or [()] * len(self)
        other_images = other.images or [()] * len(other)
        return TrainBatch(
            prompt_token_ids=self.prompt_token_ids + other.prompt_token_ids,
            response_token_ids=self.response_token_ids + other.response_token_ids,
            advantages=torch.cat([self.advantages, other.advantages]),
            images=images + other_images if self.images or other.images else [],
            **{name: cat(getattr(self, name), getattr(other, name)) for name in LOGPROB_FIELDS},
        )

    def with_logprobs(
        self,
        old: Tensor | None = None,
        ref: Tensor | None = None,
        behaviour: Tensor | None = None,
    ) -> TrainBatch:
        """A copy with ``old_logprobs``, ``ref_logprobs`` and/or ``behaviour_logprobs``
        ``(B, L)`` set (None keeps the field as it is)."""
        return replace(
            self,
            old_logprobs=self.old_logprobs if old is None else old,
            ref_logprobs=self.ref_logprobs if ref is None else ref,
            behaviour_logprobs=self.behaviour_logprobs if behaviour is None else behaviour,
        )


def padding_batch(num_rows: int = 1) -> TrainBatch:
    """``num_rows`` rollouts that carry no training signal: a one-token prompt (id 0), no
    response token, advantage 0, old, reference and behaviour log-probs 0. A rank whose
    shard is shorter than its peers' runs its forward/backward on these, so every rank issues
    the same FSDP/ZeRO collectives; their loss is 0 with a zero gradient.
    """
    return TrainBatch(
        prompt_token_ids=[[0] for _ in range(num_rows)],
        response_token_ids=[[] for _ in range(num_rows)],
        advantages=torch.zeros(num_rows),
        images=[],
        **{name: torch.zeros(num_rows, 1) for name in LOGPROB_FIELDS},
    )


def vision_filler(image_processor: Any, token_ids: Mapping[str, int]) -> TrainBatch:
    """One rollout that makes the vision tower run and carries no training signal: a prompt
    ``<|vision_start|><|image_pad|>…<|vision_end|>`` with one white image of the smallest
    grid (``factor × factor`` pixels: one token), no response, advantage 0, log-probs 0
    (every :data:`LOGPROB_FIELDS` field, so appending it keeps a batch's log-probs).

    With FSDP2 every sharded vision block all-gathers its parameters in each forward, so all
    ranks must run the vision tower in every micro-batch or the collectives hang; a rank
    whose micro-batch has no image (padding, a text prompt) appends this rollout.
    ``token_ids`` maps ``"vision_start"``, ``"image_pad"``, ``"vision_end"`` to their ids
    (the model config's ``vision_start_token_id``, ``image_token_id``, ``vision_end_token_id``).
    """
    factor = image_processor.patch_size * image_processor.merge_size
    png = io.BytesIO()
    Image.new("RGB", (factor, factor), (255, 255, 255)).save(png, format="PNG")
    prompt = [token_ids["vision_start"], token_ids["image_pad"], token_ids["vision_end"]]
    return TrainBatch(
        prompt_token_ids=[prompt],
        response_token_ids=[[]],
        advantages=torch.zeros(1),
        images=[(png.getvalue(),)],
        **{name: torch.zeros(1, 1) for name in LOGPROB_FIELDS},
    )


def sequence_lengths(batch: TrainBatch) -> list[int]:
    """Each row's length in :func:`collate`'s layout: prompt + response tokens, at least one
    response position (``(B,)`` ints; a micro-batch of rows R runs ``|R| · max`` of them)."""
    return [
        len(p) + max(len(r), 1)
        for p, r in zip(batch.prompt_token_ids, batch.response_token_ids, strict=True)
    ]


def collate(batch: TrainBatch, pad_token_id: int = 0) -> dict[str, Tensor]:
    """Right-pad a batch into model inputs.

    Row ``i`` is ``prompt_i + response_i`` followed by ``pad_token_id`` up to ``T``, so a
    real token never attends to padding (causal attention) and positions are ``0..T-1``.
    The pad id's value therefore does not matter.

    Returns:
        ``input_ids`` ``(B, T)`` long; ``attention_mask`` ``(B, T)`` long, 1 on real tokens;
        ``position_ids`` ``(B, T)`` long, ``0..T-1``; ``response_start`` ``(B,)`` long,
        the prompt length (index of response token 0 in ``input_ids``); ``response_mask``
        ``(B, L)`` float, 1 on response tokens, ``L = max(1, longest response)``;
        ``advantages`` ``(B,)`` float32; and ``old_logprobs`` / ``ref_logprobs`` /
        ``behaviour_logprobs`` ``(B, L)`` float32 (zeroed under the mask) when the batch has
        them. ``T`` is at least one token past the longest prompt, so every row has a
        position for response token 0.

    Raises:
        ValueError: the batch is empty.
    """
    if len(batch) == 0:
        raise ValueError("cannot collate an empty batch; use padding_batch() for a filler row")
    prompt_lens = [len(p) for p in batch.prompt_token_ids]
    response_lens = [len(r) for r in batch.response_token_ids]
    width = max(1, max(response_lens))
    total = max(p + max(r, 1) for p, r in zip(prompt_lens, response_lens, strict=True))
    rows = len(batch)
    input_ids = torch.full((rows, total), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, total), dtype=torch.long)
    response_mask = torch.zeros((rows, width), dtype=torch.float32)
    for i, (prompt, response) in enumerate(
        zip(batch.prompt_token_ids, batch.response_token_ids, strict=True)
    ):
        tokens = list(prompt) + list(response)
        input_ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[i, : len(tokens)] = 1
        response_mask[i, : len(response)] = 1.0
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": torch.arange(total).expand(rows, total).clone(),
        "response_start": torch.tensor(prompt_lens, dtype=torch.long),
        **loss_inputs(batch, response_mask),
    }


def loss_inputs(batch: TrainBatch, response_mask: Tensor) -> dict[str, Tensor]:
    """What the policy loss takes besides the log-probs, for a ``(B, L)`` ``response_mask``:
    the mask, ``advantages`` ``(B,)`` float32, and each :data:`LOGPROB_FIELDS` field
    ``(B, L)`` float32 zeroed under the mask when the batch has it (:func:`collate`,
    ``shared_prompt.collate_shared``)."""
    width = response_mask.shape[1]
    out = {
        "response_mask": response_mask,
        "advantages": batch.advantages.detach().to(torch.float32),
    }
    for name in LOGPROB_FIELDS:
        value = getattr(batch, name)
        if value is not None:
            out[name] = value[:, :width].detach().to(torch.float32) * response_mask
    return out


def token_logprobs(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor | None,
    response_start: Tensor,
    response_mask: Tensor,
    temperature: float = 1.0,
    vision: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Log-probs (nats) of the response tokens under ``model``: ``log_softmax(logits / T)``
    gathered at each response token (the sampling distribution at temperature ``T``).

    Inputs are :func:`collate`'s, on the model's device. Memory: logits are kept only from
    the first response position on (``logits_to_keep``), and the log-prob is
    ``logit[target] - logsumexp(logits)``, which avoids a second ``(B, T, V)`` tensor. Call
    it per micro-batch; gradients flow unless the caller disables them.

    Args:
        model: a causal LM taking ``input_ids``, ``attention_mask``, ``position_ids`` and
            ``logits_to_keep`` (transformers ``*ForCausalLM``, or a vision-language
            ``*ForConditionalGeneration``), possibly FSDP-wrapped.
        input_ids, attention_mask: ``(B, T)``.
        position_ids: ``(B, T)``, or None: the model computes its own (Qwen2.5-VL: 3-D mRoPE
            from ``input_ids``, ``mm_token_type_ids`` and ``image_grid_thw``; 0..T-1 would be
            wrong for it).
        response_start: ``(B,)`` index of response token 0 in each row (prompt length).
        response_mask: ``(B, L)`` 1 on response tokens.
        temperature: the rollout temperature, > 0.
        vision: ``shuffle_r1.data.images.vision_inputs``'s tensors for a batch with images,
            passed to the model.

    Returns:
        ``(B, L)`` float32, 0 where ``response_mask`` is 0.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    total = input_ids.shape[1]
    width = response_mask.shape[1]
    first = int(response_start.min())
    keep = total - first + 1  # logits at positions first-1 .. T-1
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=keep,
        use_cache=False,
        **(vision or {}),
    ).logits
    logits = logits[:, :-1].float()  # positions first-1 .. T-2 predict tokens first .. T-1
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, first:]
    window = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    columns = torch.arange(width, device=input_ids.device)
    index = (response_start.unsqueeze(1) - first + columns).clamp(max=window.shape[1] - 1)
    picked = window.gather(1, index)
    return torch.where(response_mask.bool(), picked, torch.zeros_like(picked))
