"""The plain records of rollout, which cross process boundaries: how to sample
(:class:`SamplingSpec`), one prompt (:class:`GenerationRequest`), one sampled response
(:class:`Completion`), one worker's answer to one chunk (:class:`GenerateReply`) and the pool's
answer to one call (:class:`RolloutResult`). Importable by the trainer without Ray doing
anything.

placeholders itself, so it gets one ``<|image_pad|>`` per image and its expanded prompt is
checked against the request's).

Seeds. With ``SamplingSpec.seed`` set, each request draws from its own stream seeded by
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample: ``n`` completions per request of at most ``max_tokens`` tokens each,
    at ``temperature`` with nucleus ``top_p`` (1.0 = off; no top-k); ``temperature`` 0 is
    greedy decoding (log-probs then at temperature 1). ``seed`` None draws from the engine's
    own stream; an int makes every request reproducible (module doc)."""

    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingSpec.n={self.n} must be >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingSpec.temperature={self.temperature} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSpec.top_p={self.top_p} must be in (0, 1]")
        if self.max_tokens < 1:
            raise ValueError(f"SamplingSpec.max_tokens={self.max_tokens} must be >= 1")


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt, already tokenised (chat template applied). ``request_id`` must be
    unique within a :meth:`RolloutPool.generate` call; completions carry it back.
    ``images``: the prompt's images in order, encoded (``shuffle_r1.data.images.ImageSpec.
    prepare``), with their ``<|image_pad|>`` tokens expanded in ``prompt_token_ids``."""

    request_id: str
    prompt_token_ids: list[int]
    images: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Completion:
    """One sampled response.

    Attributes:
        request_id: the request it answers.
        index: 0..n-1 within the request's group.
        token_ids: ``(T,)`` response tokens, ``1 <= T <= max_tokens``; ends with the EOS
            token iff ``finish_reason == "stop"``.
        logprobs: ``(T,)`` log-prob (nats, ≤ 0) of each token under the policy at
            ``weight_version`` (:mod:`actors.rollout.engines` for the exact definition per engine).
        finish_reason: ``"stop"`` (EOS sampled) or ``"length"`` (``max_tokens`` reached).
        weight_version: the weights that produced it.
        images: how many images the engine encoded with the prompt (0 for text).
    """

    request_id: str
    index: int
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    weight_version: int
    images: int = 0


def request_seed(seed: int, request_id: str) -> int:
    """The sampling seed of one request: a 63-bit hash of ``(seed, request_id)``."""
    digest = hashlib.blake2b(f"{seed}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@dataclass(frozen=True)
class GenerateReply:
    """What one worker returns for one chunk: its id, the chunk's completions and the wall
    seconds its engine took for them (``engine_s``, without queueing and transport)."""

    worker: str
    completions: list[Completion]
    engine_s: float = 0.0


@dataclass(frozen=True)
class RolloutResult:
    """What :meth:`RolloutPool.generate` returns.

    Attributes:
        completions: ``n`` per request, flat, in request order then index.
        generate_s: wall seconds of the generate calls (after the workers had synced).
        engine_s: the longest of the workers' engine seconds (:class:`GenerateReply`; with
            one worker, ``generate_s - engine_s`` is the serving path's share).
        sync_s: wall seconds spent bringing the workers to the requested weight version; 0.0
            when every worker was already there.
        tokens: response tokens generated (sum of ``len(token_ids)``).
        resent: requests re-sent because the worker serving them died.
        served: requests served per worker id.
    """

    completions: list[Completion]
    generate_s: float
    sync_s: float
    tokens: int
    resent: int
    served: dict[str, int] = field(default_factory=dict)
    engine_s: float = 0.0
