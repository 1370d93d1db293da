"""The learner's batch layout and arithmetic, shared by every training backend (pure torch).

A training batch is a list of rollouts (prompt token ids + response token ids, and the
prompt's images for a multimodal model) with one advantage each, in the order the buffer
served them: both rollouts of a PTS pair are adjacent (docs/algorithm.md §3.4). This module

- collates rollouts into right-padded model inputs (:func:`collate`; their images go through
  ``shuffle_r1.data.images.vision_inputs``);
- computes the log-probs of the response tokens under a model (:func:`token_logprobs`);
- plans how a batch is cut: into optimizer mini-batches of
  :func:`rollouts_per_optimizer_step` rollouts (:func:`minibatch_slices`), each into
  contiguous pair-aligned shards, one per rank (:func:`pair_aligned_shards`), each shard
  into the same number of micro-batches on every rank (:func:`microbatch_count`,
  :func:`microbatch_slices`, :func:`padding_batch`).

Log-probs, masks and old log-probs are ``(B, L)`` over response tokens: column ``j`` is
response token ``j`` of each rollout, ``L`` the longest response of the batch, the rest
padding (mask 0, value 0). That is the layout :func:`shuffle_r1.algos.policy_loss` takes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from shuffle_r1.algos import pairs_kept
from shuffle_r1.config import ABS_MINIBATCH_ORDERS


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
        images: B tuples of the prompts' images (``shuffle_r1.data.images`` PNG bytes, in
            prompt order; ``()`` for a text prompt), or ``[]`` for a text-only batch. A
            prompt's ``<|image_pad|>`` tokens are already expanded to its images' grids.
    """

    prompt_token_ids: list[list[int]]
    response_token_ids: list[list[int]]
    advantages: Tensor
    old_logprobs: Tensor | None = None
    ref_logprobs: Tensor | None = None
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
        for name in ("old_logprobs", "ref_logprobs"):
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
                old_logprobs=None if self.old_logprobs is None else self.old_logprobs[rows],
                ref_logprobs=None if self.ref_logprobs is None else self.ref_logprobs[rows],
                images=self.images[rows],
            )
        index = torch.tensor(list(rows), dtype=torch.long)
        return TrainBatch(
            prompt_token_ids=[self.prompt_token_ids[i] for i in rows],
            response_token_ids=[self.response_token_ids[i] for i in rows],
            advantages=self.advantages[index],
            old_logprobs=None if self.old_logprobs is None else self.old_logprobs[index],
            ref_logprobs=None if self.ref_logprobs is None else self.ref_logprobs[index],
            images=[self.images[i] for i in rows] if self.images else [],
        )

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
            old_logprobs=cat(self.old_logprobs, other.old_logprobs),
            ref_logprobs=cat(self.ref_logprobs, other.ref_logprobs),
            images=images + other_images if self.images or other.images else [],
        )

    def with_logprobs(self, old: Tensor | None = None, ref: Tensor | None = None) -> TrainBatch:
        """A copy with ``old_logprobs`` and/or ``ref_logprobs`` ``(B, L)`` set."""
        return replace(
            self,
            old_logprobs=self.old_logprobs if old is None else old,
            ref_logprobs=self.ref_logprobs if ref is None else ref,
        )


def padding_batch(num_rows: int = 1) -> TrainBatch:
    """``num_rows`` rollouts that carry no training signal: a one-token prompt (id 0), no
    response token, advantage 0, old and reference log-probs 0. A rank whose shard is
    shorter than its peers' runs its forward/backward on these, so every rank issues the
    same FSDP/ZeRO collectives; their loss is 0 with a zero gradient.
    """
    return TrainBatch(
        prompt_token_ids=[[0] for _ in range(num_rows)],
        response_token_ids=[[] for _ in range(num_rows)],
        advantages=torch.zeros(num_rows),
        old_logprobs=torch.zeros(num_rows, 1),
        ref_logprobs=torch.zeros(num_rows, 1),
    )


def vision_filler(image_processor: Any, token_ids: Mapping[str, int]) -> TrainBatch:
    """One rollout that makes the vision tower run and carries no training signal: a prompt
    ``<|vision_start|><|image_pad|>…<|vision_end|>`` with one white image of the smallest
    grid (``factor × factor`` pixels: one token), no response, advantage 0, log-probs 0.

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
        old_logprobs=torch.zeros(1, 1),
        ref_logprobs=torch.zeros(1, 1),
        images=[(png.getvalue(),)],
    )


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
        ``advantages`` ``(B,)`` float32; and ``old_logprobs`` / ``ref_logprobs`` ``(B, L)``
        float32 (zeroed under the mask) when the batch has them. ``T`` is at least one
        token past the longest prompt, so every row has a position for response token 0.

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
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": torch.arange(total).expand(rows, total).clone(),
        "response_start": torch.tensor(prompt_lens, dtype=torch.long),
        "response_mask": response_mask,
        "advantages": batch.advantages.detach().to(torch.float32),
    }
    for name in ("old_logprobs", "ref_logprobs"):
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


def rollouts_per_optimizer_step(global_batch_size: int, n: int, keep_ratio: float) -> int:
    """Rollouts in one optimizer mini-batch: ``global_batch_size · 2·floor(α·n/2)``.

    ``global_batch_size`` prompts per optimizer step as GRPO counts them, ``n`` rollouts per
    prompt, α = ``keep_ratio`` (1 for plain GRPO). PTS keeps ``2·floor(α·n/2)`` = α·n
    rollouts of each group, so the mini-batch shrinks by α and a training step makes as
    many optimizer steps as GRPO's (docs/algorithm.md §2). Reference: 128 · 16 · 0.5 = 1024.

    Raises:
        ValueError: ``global_batch_size`` < 1, or ``n`` / ``keep_ratio`` invalid for PTS.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1 prompt, got {global_batch_size}")
    return global_batch_size * 2 * pairs_kept(n, keep_ratio)


def _check_even(name: str, value: int, minimum: int) -> None:
    if value < minimum or value % 2:
        raise ValueError(
            f"{name} must be an even number >= {minimum} so both rollouts of a pair stay "
            f"together, got {value}"
        )


def minibatch_slices(num_rollouts: int, rollouts_per_minibatch: int) -> list[slice]:
    """Consecutive optimizer mini-batches of ``rollouts_per_minibatch`` rollouts (§3.4).

    The last one is shorter when ``num_rollouts`` is not a multiple (an ABS shortfall).
    Both sizes are even, so no pair is cut.

    Raises:
        ValueError: ``num_rollouts`` is odd or negative, or ``rollouts_per_minibatch`` is
            not an even number >= 2.
    """
    _check_even("num_rollouts", num_rollouts, 0)
    _check_even("rollouts_per_minibatch", rollouts_per_minibatch, 2)
    return [
        slice(start, min(start + rollouts_per_minibatch, num_rollouts))
        for start in range(0, num_rollouts, rollouts_per_minibatch)
    ]


def abs_minibatch_rows(
    round_sizes: Sequence[int], rollouts_per_minibatch: int, order: str = "interleaved"
) -> list[list[int]]:
    """The rollout rows of each optimizer mini-batch of an ABS batch (docs/algorithm.md §3.4).

    The batch holds the drawn pairs round after round (``round_sizes[r]`` pairs in round
    r, each pair two adjacent rollouts). It makes ``K = ceil(2·D / rollouts_per_minibatch)``
    optimizer steps, D = ``sum(round_sizes)``, whichever the order:

    - ``"sequential"``: mini-batch k is rollouts [k·M, (k+1)·M) of the batch, M =
      ``rollouts_per_minibatch`` (:func:`minibatch_slices`): step k gets whole rounds.
    - ``"interleaved"`` (the upstream layout): every round is cut into K contiguous parts and
      mini-batch k is part k of every round, rounds in order. Upstream (Shuffle-R1's code
      on verl, 8 data-parallel ranks, S = 8) hands each rank one round as its chunk and
      each optimizer step takes the next slice of every rank's chunk, so step k trains on
      positions [k·T/K, (k+1)·T/K) of every round and the first step holds each round's
      first (highest-Φ) draws. Parts differ by at most one pair: round r's ``T_r mod K``
      longer parts go to the mini-batches after those the previous rounds lengthened, so
      mini-batch sizes also differ by at most one pair. When K divides every ``T_r`` this
      is exactly the upstream layout.

    With one round (S = 1) both orders keep the draw order; they cut at the same places
    when ``rollouts_per_minibatch`` divides the batch (otherwise ``interleaved`` makes K
    near-equal parts, ``sequential`` full ones and a short last one). The trainer uses
    ``sequential`` for ``grpo+pts``.

    Args:
        round_sizes: pairs per round, as :class:`~shuffle_r1.algos.ShuffleResult` gives them.
        rollouts_per_minibatch: M, an even number >= 2.
        order: ``"interleaved"`` or ``"sequential"``.

    Returns:
        K lists of row indices into the batch, both rows of a pair always in the same list,
        none empty.

    Raises:
        ValueError: an unknown order, a negative round size or an invalid M.
    """
    if order not in ABS_MINIBATCH_ORDERS:
        raise ValueError(f"order must be one of {ABS_MINIBATCH_ORDERS}, got {order!r}")
    if any(t < 0 for t in round_sizes):
        raise ValueError(f"round sizes must be >= 0, got {list(round_sizes)}")
    _check_even("rollouts_per_minibatch", rollouts_per_minibatch, 2)
    total = 2 * sum(round_sizes)
    if order == "sequential":
        return [
            list(range(s.start, s.stop)) for s in minibatch_slices(total, rollouts_per_minibatch)
        ]
    count = math.ceil(total / rollouts_per_minibatch)
    minibatches: list[list[int]] = [[] for _ in range(count)]
    first_pair, cursor = 0, 0  # cursor: the mini-batch that gets the next longer part
    for size in round_sizes:
        base, extra = divmod(size, count) if count else (0, 0)
        longer = {(cursor + i) % count for i in range(extra)}
        cursor = (cursor + extra) % count if count else 0
        pair = first_pair
        for k in range(count):
            part = base + (k in longer)
            minibatches[k].extend(range(2 * pair, 2 * (pair + part)))
            pair += part
        first_pair += size
    return [rows for rows in minibatches if rows]


def minibatch_pair_stats(
    pair_indices: Sequence[int], minibatches: Sequence[Sequence[int]]
) -> dict[str, float]:
    """What each optimizer step of an ABS batch rests on (docs/algorithm.md §3).

    Args:
        pair_indices: the batch's rollouts' pair index (``SampledItem.pair_index``), one
            per row.
        minibatches: rows of each optimizer mini-batch (:func:`abs_minibatch_rows`).

    Returns:
        ``minibatches`` (K); ``pairs_per_minibatch`` (drawn pairs, repeats counted) and
        ``distinct_pairs_per_minibatch``, means over the K steps; ``max_multiplicity``, the
        most times one pair recurs within one step; ``distinct_pairs``, over the whole
        batch. Empty input gives zeros.
    """
    per_step, distinct, most = [], [], 0
    for rows in minibatches:
        counts: dict[int, int] = {}
        for row in rows[::2]:  # a pair is two adjacent rows
            counts[pair_indices[row]] = counts.get(pair_indices[row], 0) + 1
        per_step.append(sum(counts.values()))
        distinct.append(len(counts))
        most = max([most, *counts.values()])
    k = len(per_step)
    return {
        "minibatches": float(k),
        "pairs_per_minibatch": sum(per_step) / k if k else 0.0,
        "distinct_pairs_per_minibatch": sum(distinct) / k if k else 0.0,
        "max_multiplicity": float(most),
        "distinct_pairs": float(len(set(pair_indices))),
    }


def pair_aligned_shards(num_rollouts: int, num_shards: int) -> list[slice]:
    """Cut ``num_rollouts`` rollouts into ``num_shards`` contiguous shards of whole pairs.

    Shard sizes differ by at most one pair; the first shards get the extra pairs. A shard
    may be empty (fewer pairs than shards).

    Raises:
        ValueError: ``num_rollouts`` is odd or negative, or ``num_shards`` < 1.
    """
    _check_even("num_rollouts", num_rollouts, 0)
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    per, extra = divmod(num_rollouts // 2, num_shards)
    slices, start = [], 0
    for rank in range(num_shards):
        size = 2 * (per + (rank < extra))
        slices.append(slice(start, start + size))
        start += size
    return slices


def microbatch_count(shard_sizes: list[int], micro_batch_size: int) -> int:
    """Micro-batches every rank runs for shards of ``shard_sizes`` rollouts:
    ``max(1, max_r ceil(shard_sizes[r] / micro_batch_size))``.

    The ranks of a sharded model (FSDP2, ZeRO-3) must run the same number of forwards and
    backwards, since each one all-gathers parameters; a rank with a shorter shard pads with
    empty micro-batches (:func:`microbatch_slices`, :func:`padding_batch`).

    Raises:
        ValueError: ``micro_batch_size`` < 1.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return max([1, *(math.ceil(size / micro_batch_size) for size in shard_sizes)])


def microbatch_slices(num_rollouts: int, micro_batch_size: int, count: int) -> list[slice]:
    """Cut a rank's shard of ``num_rollouts`` rollouts into ``count`` consecutive micro-batches
    of at most ``micro_batch_size`` rollouts; those past the end are empty slices.

    With ``micro_batch_size`` even (as the config requires under PTS) a pair is never cut.

    Raises:
        ValueError: ``count`` micro-batches cannot hold the shard, or a size is < 1.
    """
    if micro_batch_size < 1 or count < 1:
        raise ValueError(
            f"micro_batch_size and count must be >= 1, got {micro_batch_size}, {count}"
        )
    if num_rollouts > micro_batch_size * count:
        raise ValueError(
            f"{count} micro-batches of {micro_batch_size} cannot hold {num_rollouts} rollouts"
        )
    return [
        slice(
            min(i * micro_batch_size, num_rollouts), min((i + 1) * micro_batch_size, num_rollouts)
        )
        for i in range(count)
    ]
