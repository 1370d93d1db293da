"""LoRA adapters on the policy (``learner.lora_rank > 0``), through ``peft``.

The learner trains rank-``r`` adapters ``A`` ``(r, in)`` and ``B`` ``(out, r)`` beside each
targeted Linear weight ``W`` ``(out, in)``, which stays frozen; the layer computes
``W x + (alpha / r) · B A x`` (Hu et al. 2021, "LoRA", eq. 3; peft's ``LoraLayer``). What
leaves the learner — the weights published to the rollout workers and a checkpoint's
``model/`` — is the merged model, ``W + (alpha / r) · B A`` under the base model's own names,
so vLLM and ``from_pretrained`` load it as a plain model. The adapters alone (what a resume
restores) are a checkpoint's :data:`ADAPTER_FILE`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from shuffle_r1.config import LearnerConfig

# a checkpoint's adapter weights (peft's state-dict names), beside model/ (merged)
ADAPTER_FILE = "lora_adapters.safetensors"
_PREFIX = "base_model.model."  # what PeftModelForCausalLM puts before the base model's names
_BASE = ".base_layer"  # a LoRA layer's frozen Linear
_ADAPTER = "default"  # peft's adapter name


def add_lora(model: torch.nn.Module, cfg: LearnerConfig) -> Any:
    """``model`` wrapped by ``peft.get_peft_model`` with rank ``cfg.lora_rank`` adapters
    (``lora_alpha``, ``lora_target_modules``, no dropout, no bias): only the adapters require
    gradients. ``B`` starts at zero, so the wrapped model computes what ``model`` did.

    Raises:
        ValueError: no module of ``model`` matches ``learner.lora_target_modules``.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.lora_target_modules),
        lora_dropout=0.0,
        bias="none",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(
            f"learner.lora_target_modules={list(cfg.lora_target_modules)}: {exc}"
        ) from exc


def base_name(name: str) -> str:
    """The base model's name of a peft state-dict entry:
    ``base_model.model.x.q_proj.base_layer.weight`` → ``x.q_proj.weight``."""
    name = name.removeprefix(_PREFIX)
    return name.replace(_BASE + ".", ".")


def is_adapter(name: str) -> bool:
    """Whether a peft state-dict entry is an adapter weight (``lora_A`` / ``lora_B``)."""
    return ".lora_A." in name or ".lora_B." in name


def merge_lora_state(state: dict[str, Tensor], cfg: LearnerConfig) -> dict[str, Tensor]:
    """The merged model's state dict from a peft model's (full, unsharded): every LoRA
    layer's weight becomes ``W + scaling · B A`` (float32 product, cast back to ``W``'s
    dtype), adapters dropped, names as :func:`base_name`; ``scaling`` is
    ``cfg.lora_alpha / cfg.lora_rank``, as :func:`add_lora` configures peft. Tensors shared
    between names (tied embeddings) stay shared.

    Raises:
        KeyError: an adapter without its base weight or its other half.
    """
    scaling = cfg.lora_alpha / cfg.lora_rank
    merged: dict[str, Tensor] = {}
    for name, value in state.items():
        if is_adapter(name):
            continue
        if name.endswith(_BASE + ".weight"):
            layer = name[: -len(_BASE + ".weight")]
            a = state[f"{layer}.lora_A.{_ADAPTER}.weight"].float()
            b = state[f"{layer}.lora_B.{_ADAPTER}.weight"].float()
            value = (value.float() + scaling * (b @ a)).to(value.dtype)
        merged[base_name(name)] = value
    return merged
