"""The records a step turns into others: its prompts, completions and scores into the
replay buffer's protobuf groups, and a sampled batch back into the learner's
:class:`~shuffle_r1.training.TrainBatch`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from protos import replay_buffer_pb2 as pb
from services.replay_buffer.client import item_prompts
from shuffle_r1.data.splits import Prompt
from shuffle_r1.training import TrainBatch


def step_groups(
    run_id: str,
    step: int,
    prompts: Sequence[Prompt],
    completions: Sequence[Any],
    scores: Sequence[Any],
    n: int,
    logprobs: bool = True,
) -> list[pb.Group]:
    """One ``Group`` per prompt: its ``n`` completions (``actors.rollout`` completions, in
    prompt order, n per prompt) with their scores (``actors.reward``), the prompt's tokens,
    reference answer and images. A completion cut at ``rollout.max_response_length`` is
    marked ``truncated``. Its sampling log-probs go with it when ``logprobs`` (the run's
    ``RunSpec.logprobs`` is ``LOGPROBS_REQUIRED``)."""
    groups = []
    for g, p in enumerate(prompts):
        own = slice(g * n, (g + 1) * n)
        rollouts = [
            pb.Rollout(
                token_ids=c.token_ids,
                logprobs=c.logprobs if logprobs else (),
                reward=s.reward,
                weight_version=c.weight_version,
                truncated=c.finish_reason == "length",
            )
            for c, s in zip(completions[own], scores[own], strict=True)
        ]
        groups.append(
            pb.Group(
                run_id=run_id,
                step=step,
                prompt_id=p.example.uid,
                prompt_token_ids=p.token_ids,
                answer=p.example.answer,
                rollouts=rollouts,
                images=[pb.Image(data=image) for image in p.images],
            )
        )
    return groups


def train_batch(sample: Any, behaviour: bool = False) -> tuple[TrainBatch, int]:
    """The learner's batch from a ``SampleResponse`` (items in training order, each with
    its prompt's images), and how many images it carries.

    ``behaviour``: also set ``behaviour_logprobs`` ``(B, L)`` float32 from each item's
    ``rollout.logprobs``, the rollout engine's sampling log-probs (stored when the run's
    ``RunSpec.logprobs`` is ``LOGPROBS_REQUIRED``), right-padded with 0 to the longest
    response: the behaviour policy of the decoupled loss (docs/algorithm.md §4, "Off-policy
    rollouts").

    Raises:
        ValueError: an image came back by URI (see :func:`_image_bytes`), or, with
            ``behaviour``, a rollout's log-probs are not one per response token.
    """
    images = {pid: _image_bytes(pid, found.images) for pid, found in sample.images.items()}
    batch = TrainBatch(
        prompt_token_ids=item_prompts(sample),
        response_token_ids=[list(it.rollout.token_ids) for it in sample.items],
        advantages=torch.tensor([it.advantage for it in sample.items]),
        behaviour_logprobs=_behaviour_logprobs(sample.items) if behaviour else None,
        images=[images.get(it.prompt_id, ()) for it in sample.items] if images else [],
    )
    return batch, sum(len(v) for v in images.values())


def _behaviour_logprobs(items: Sequence[Any]) -> torch.Tensor:
    """``(B, L)`` float32: row ``i`` holds item ``i``'s sampling log-probs, then zeros up
    to ``L``, the longest response. Raises ``ValueError`` naming the group of a rollout
    whose log-probs are not one per response token."""
    for it in items:
        tokens, logprobs = len(it.rollout.token_ids), len(it.rollout.logprobs)
        if logprobs != tokens:
            raise ValueError(
                f"group {it.prompt_id!r} (step {it.step}, rollout {it.rollout_index}): "
                f"{logprobs} sampling log-probs for {tokens} response tokens; off-policy "
                "training needs one per token: put the run's groups with RunSpec.logprobs = "
                "LOGPROBS_REQUIRED"
            )
    width = max((len(it.rollout.token_ids) for it in items), default=0)
    out = torch.zeros(len(items), width)
    for i, it in enumerate(items):
        out[i, : len(it.rollout.logprobs)] = torch.tensor(list(it.rollout.logprobs))
    return out


def _image_bytes(prompt_id: str, images: Any) -> tuple[bytes, ...]:
    """The encoded images of a sampled group (``SampleResponse.images[prompt_id]``). Raises
    ``ValueError`` for an image given by URI: the trainer puts bytes, and a URI would be
    readable only where its storage is."""
    if any(image.WhichOneof("source") != "data" for image in images):
        raise ValueError(
            f"group {prompt_id!r}: the replay buffer returned an image by URI; the learner "
            "needs the encoded bytes (put images as Image.data)"
        )
    return tuple(image.data for image in images)
