"""The transformers engine (:class:`HFEngine`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from actors.rollout.engines import Engine
from actors.rollout.records import Completion, GenerationRequest, SamplingSpec, request_seed
from shuffle_r1.config import RolloutConfig
from shuffle_r1.data.images import vision_inputs
from shuffle_r1.models import load_policy_model
from shuffle_r1.precision import resolve_dtype


class HFEngine(Engine):
    """transformers ``generate``, one request at a time (``n`` sequences in a batch).

    Sampling: temperature ``T``, nucleus ``top_p``, no top-k (transformers' default
    top-k of 50 is switched off, as in vLLM), no other processors. Log-probs are
    ``log_softmax(logits / T)`` of the raw logits (``output_logits=True``) at the sampled
    tokens, i.e. before the top-p cut (:mod:`actors.rollout.engines`); memory per request is
    ``n × max_tokens × vocab`` logits. Tokens after the first EOS (padding of finished
    sequences) are dropped; the EOS token itself is kept, as vLLM does. EOS ids are those
    of the model's ``generation_config``. Runs on CUDA when
    ``cfg.num_gpus_per_worker > 0`` and a GPU is visible, else on CPU with
    ``cfg.threads_per_worker`` threads. ``seed`` seeds the process-wide torch RNG, which
    serves requests without a seed.

    A vision-language model (Qwen2.5-VL) is loaded with its processor
    (``shuffle_r1.processor``); a request's images become ``pixel_values``,
    ``image_grid_thw`` and ``mm_token_type_ids`` (``shuffle_r1.data.images.vision_inputs``),
    from which ``generate`` computes the 3-D mRoPE positions.
    """

    name = "hf"

    def __init__(self, model_path: str | Path, cfg: RolloutConfig, seed: int) -> None:
        super().__init__()
        use_gpu = cfg.num_gpus_per_worker > 0 and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        if not use_gpu:
            torch.set_num_threads(cfg.threads_per_worker)
        torch.manual_seed(seed)
        # Any: transformers' annotations of .to and .generate do not bind ``self``
        self.dtype = resolve_dtype(cfg.dtype, cuda=use_gpu).dtype
        self.model = cast(Any, load_policy_model(model_path, dtype=getattr(torch, self.dtype)))
        self.model.to(self.device).eval()
        self.image_token_id: int | None = getattr(self.model.config, "image_token_id", None)
        self.image_processor: Any = None
        if hasattr(self.model.config, "vision_config"):
            from shuffle_r1.processor import load_processor

            self.image_processor = load_processor(model_path).image_processor
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            raise ValueError(f"{model_path}: generation_config.json names no eos_token_id")
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
        pad = self.model.generation_config.pad_token_id
        self.pad_token_id = self.eos_token_ids[0] if pad is None else pad

    @torch.no_grad()
    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingSpec
    ) -> list[Completion]:
        from transformers import GenerationConfig

        greedy = sampling.temperature == 0
        config = GenerationConfig(
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,
            max_new_tokens=sampling.max_tokens,
            num_return_sequences=1 if greedy else sampling.n,  # greedy: one, copied n times
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            return_dict_in_generate=True,
            output_logits=True,
        )
        eos = set(self.eos_token_ids)
        completions = []
        for request in requests:
            if sampling.seed is not None:
                torch.manual_seed(request_seed(sampling.seed, request.request_id))
            prompt = torch.tensor([request.prompt_token_ids], device=self.device)
            out = self.model.generate(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                generation_config=config,
                **self._vision(request, prompt),
            )
            tokens = out.sequences[:, prompt.shape[1] :]  # (n, S), S <= max_tokens
            for index in range(sampling.n):
                seq = 0 if greedy else index
                logits = torch.stack([step[seq] for step in out.logits])  # (S, V)
                logprobs = torch.log_softmax(logits.float() / (sampling.temperature or 1.0), -1)
                row = tokens[seq].tolist()
                stop = next((t for t, token in enumerate(row) if token in eos), None)
                length = len(row) if stop is None else stop + 1
                picked = logprobs[torch.arange(length), tokens[seq, :length]]
                completions.append(
                    Completion(
                        request.request_id,
                        index,
                        row[:length],
                        picked.tolist(),
                        "length" if stop is None else "stop",
                        self.weight_version,
                        len(request.images),
                    )
                )
        return completions

    def _vision(self, request: GenerationRequest, prompt: Tensor) -> dict[str, Tensor]:
        """The request's vision inputs on the device (none for a text prompt). Raises
        ValueError naming the request: images for a text-only model, or a prompt whose
        image tokens do not match its images."""
        if not request.images:
            return {}
        if self.image_processor is None or self.image_token_id is None:
            raise ValueError(
                f"request {request.request_id!r} has {len(request.images)} image(s) but the "
                "model is text-only"
            )
        try:
            inputs = vision_inputs(
                [request.images], prompt, self.image_processor, self.image_token_id
            )
        except ValueError as exc:
            raise ValueError(f"request {request.request_id!r}: {exc}") from exc
        return {k: v.to(self.device) for k, v in inputs.items()}

    def load_weights(self, version: int, state_dict: dict[str, Tensor]) -> None:
        """``model.load_state_dict(strict=True)``: every key must match (copies, casting
        to the model's dtype); raises ``RuntimeError`` naming missing/unexpected keys."""
        self.model.load_state_dict(state_dict, strict=True)
        self._weight_version = version
