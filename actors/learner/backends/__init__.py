"""Learner backends: what a rank needs from the library that shards its model and steps its
optimizer. One interface (:class:`Backend`), one file per backend —
:class:`~actors.learner.backends.fsdp2.FSDP2Backend` (``learner.backend=fsdp2``,
``fully_shard`` on each block, then on the root) and
:class:`~actors.learner.backends.deepspeed.DeepSpeedBackend` (``learner.backend=deepspeed``,
ZeRO stage ``learner.zero_stage``) — and :func:`make_backend`, which picks one.

Parameters are float32 masters either way; a rank whose dtype resolves to bfloat16 computes
in bf16 (FSDP2 ``MixedPrecisionPolicy`` with float32 gradient reduction; DeepSpeed ``bf16``).
Every public method except :attr:`Backend.module` is collective: all ranks call it, in the
same order.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from actors.rollout.transport import FlatWeights, pack, tied_names
from shuffle_r1.config import LearnerConfig

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class Backend:
    """The interface both backends share, for rank ``rank`` of ``world_size``.

    Args:
        cfg: ``learner`` (optimizer, clipping, micro-batch size, ZeRO stage).
        device: where this rank computes.
        dtype: the compute dtype, ``"bfloat16"`` or ``"float32"`` (the masters stay float32).
        model_path: the model folder (named in errors).

    Attributes:
        model: what a forward pass calls, ``train()``/``eval()`` included — the FSDP2 module
            or the DeepSpeed engine; None before :meth:`wrap`.
        optimizer: the optimizer whose ``param_groups[0]["lr"]`` is the learning rate.
    """

    def __init__(
        self,
        cfg: LearnerConfig,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        dtype: str,
        model_path: str,
    ) -> None:
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.dtype = dtype
        self.model_path = model_path
        self.model: Any = None
        self.optimizer: Any = None

    @property
    def module(self) -> Any:
        """The transformers model inside :attr:`model` (``save_pretrained``, parameter names)."""
        return self.model

    def wrap(self, model: torch.nn.Module) -> None:
        """Shard ``model`` (float32, on this rank's device) and build the optimizer over its
        trainable parameters; sets :attr:`model` and :attr:`optimizer`."""
        raise NotImplementedError

    def wrap_reference(self, model: torch.nn.Module) -> Any:
        """The frozen reference policy of a KL loss (``algorithm.kl_coef > 0``): ``model``
        (float32, no parameter requiring gradients, on this rank's device) sharded as
        :meth:`wrap` shards the policy, computing in the same dtype; returns what a forward
        pass calls. No optimizer."""
        raise NotImplementedError

    def backward(self, loss: Tensor) -> None:
        """Back-propagate one micro-batch's (already ``1/count``-scaled) loss; gradients
        accumulate until :meth:`step`."""
        raise NotImplementedError

    def step(self) -> tuple[float, bool]:
        """Clip the gradient norm to ``learner.grad_clip``, step the optimizer, clear the
        gradients. Returns the norm before clipping and whether the optimizer stepped."""
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, Tensor]:
        """The full model state, transformers names, master dtype: complete on rank 0; what
        other ranks get is discarded."""
        raise NotImplementedError

    def flat_state(self, dtype: torch.dtype, times: dict[str, float]) -> FlatWeights | None:
        """The full model state as :class:`~actors.rollout.transport.FlatWeights` on CPU,
        floating tensors in ``dtype`` (collective): on rank 0, ``None`` elsewhere. Adds the
        seconds of its parts to ``times``. This default gathers :meth:`full_state_dict`
        and packs it on rank 0 (``gather``, ``pack``); a backend may gather straight into
        the buckets instead."""
        start = time.perf_counter()
        state = self.full_state_dict()
        times["gather"] = time.perf_counter() - start
        if self.rank != 0:
            return None
        start = time.perf_counter()
        flat = pack(state, dtype, tied_names(self.module.state_dict(keep_vars=True)))
        times["pack"] = time.perf_counter() - start
        return flat

    def save_checkpoint(self, root: Path) -> None:
        """Write the optimizer state (and what else this backend must have to resume) under
        the checkpoint folder ``root``; the model itself is ``root/model``, written by rank 0."""
        raise NotImplementedError

    def load_checkpoint(self, root: Path) -> None:
        """Restore model and optimizer from the checkpoint folder ``root``."""
        raise NotImplementedError

    def _adamw(self, model: torch.nn.Module) -> torch.optim.AdamW:
        """AdamW over the parameters the optimizer updates (a frozen vision tower's are left
        out), with ``learner.lr`` and ``learner.weight_decay``."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW(trainable, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)


def make_backend(
    cfg: LearnerConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    dtype: str,
    model_path: str,
) -> Backend:
    """The backend ``cfg.backend`` names (arguments: :class:`Backend`). Each backend's module
    is imported only here, so a run of one never imports the other's library."""
    backend: type[Backend]
    if cfg.backend == "fsdp2":
        from actors.learner.backends.fsdp2 import FSDP2Backend

        backend = FSDP2Backend
    elif cfg.backend == "deepspeed":
        from actors.learner.backends.deepspeed import DeepSpeedBackend

        backend = DeepSpeedBackend
    else:
        raise ValueError(
            f"learner.backend={cfg.backend!r} is not allowed; choose 'fsdp2' or 'deepspeed'"
        )
    return backend(
        cfg, rank=rank, world_size=world_size, device=device, dtype=dtype, model_path=model_path
    )
