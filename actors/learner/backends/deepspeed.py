"""DeepSpeed ZeRO (stage ``learner.zero_stage``) around torch AdamW; gradient clipping and
accumulation are the engine's, and it steps whatever the gradient norm.

A checkpoint's engine state (optimizer included) goes to ``deepspeed/`` (tag ``learner``), in
DeepSpeed's own layout: only the same rank count loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from actors.learner.backends import Backend


class DeepSpeedBackend(Backend):
    """A DeepSpeed engine; :attr:`model` is the engine, :attr:`module` the model inside it."""

    @property
    def module(self) -> Any:
        return self.model.module

    def wrap(self, model: torch.nn.Module) -> None:
        import deepspeed  # at engine build: after the process group and the device are set

        le = self.cfg
        config = {
            "train_micro_batch_size_per_gpu": le.micro_batch_size,
            "gradient_accumulation_steps": 1,
            # backward() only accumulates; step() is the boundary, so a mini-batch may hold
            # any number of micro-batches (an ABS shortfall shortens the last one).
            "managed_gradient_accumulation": False,
            "gradient_clipping": le.grad_clip,
            "zero_optimization": {"stage": le.zero_stage},
            "bf16": {"enabled": self.dtype == "bfloat16"},
            "zero_allow_untested_optimizer": True,  # torch AdamW: runs on CPU and GPU
            "steps_per_print": 2**31 - 1,
        }
        optimizer = self._adamw(model)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )

    def wrap_reference(self, model: torch.nn.Module) -> Any:
        """Whole on each rank, as ZeRO stages 0-2 keep the policy (stage 3 with a KL loss is
        refused at load); bf16 when the policy computes in it."""
        return model.to(torch.bfloat16 if self.dtype == "bfloat16" else torch.float32).eval()

    def backward(self, loss: Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)

    def step(self) -> tuple[float, bool]:
        self.model.step()
        norm = self.model.get_global_grad_norm()
        return float("nan") if norm is None else float(norm), True

    def full_state_dict(self) -> dict[str, Tensor]:
        if self.cfg.zero_stage == 3:
            state: dict[str, Tensor] = self.model._zero3_consolidated_16bit_state_dict()
            return state
        return self.model.module.state_dict() if self.rank == 0 else {}

    def save_checkpoint(self, root: Path) -> None:
        self.model.save_checkpoint(str(root / "deepspeed"), tag="learner")

    def load_checkpoint(self, root: Path) -> None:
        path, _ = self.model.load_checkpoint(str(root / "deepspeed"), tag="learner")
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {root / 'deepspeed'}")
