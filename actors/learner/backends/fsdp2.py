"""FSDP2: ``fully_shard`` on each block the model's ``_no_split_modules`` names (decoder layers,
and vision blocks of a vision-language model), then on the root; torch AdamW over the shards.

A checkpoint's optimizer state goes to ``optimizer/`` through ``torch.distributed.checkpoint``
(sharded, so any rank count may load it); the model is read back from ``model/``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from actors.learner.backends import DTYPES, Backend
from shuffle_r1.models import load_policy_model

logger = logging.getLogger(__name__)


class FSDP2Backend(Backend):
    """FSDP2 with float32 gradient reduction; a non-finite gradient norm skips the step."""

    def wrap(self, model: torch.nn.Module) -> None:
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=DTYPES[self.dtype], reduce_dtype=torch.float32)
        blocks = set(getattr(model, "_no_split_modules", None) or ())
        if not blocks:
            raise ValueError(
                f"{type(model).__name__} from {self.model_path} names no decoder block class "
                "(_no_split_modules); FSDP2 needs one to shard layer by layer"
            )
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        self.model = model
        self.optimizer = self._adamw(model)

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def step(self) -> tuple[float, bool]:
        max_norm = self.cfg.grad_clip or math.inf  # 0 = measure only
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if isinstance(norm, DTensor):  # a partial norm until reduced over the ranks
            norm = norm.full_tensor()
        stepped = bool(torch.isfinite(norm))
        if stepped:
            self.optimizer.step()
        else:
            logger.warning(
                "rank %d: gradient norm is %s; skipping the optimizer step", self.rank, norm
            )
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), stepped

    def full_state_dict(self) -> dict[str, Tensor]:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state: dict[str, Any] = get_model_state_dict(self.model, options=options)
        return state

    def save_checkpoint(self, root: Path) -> None:
        optim_state = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.save({"optimizer": optim_state}, checkpoint_id=str(root / "optimizer"))

    def load_checkpoint(self, root: Path) -> None:
        full = {}
        if self.rank == 0:
            full = load_policy_model(root / "model", dtype=torch.float32).state_dict()
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.model, full, options=options)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load({"optimizer": optim_state}, checkpoint_id=str(root / "optimizer"))
        set_optimizer_state_dict(self.model, self.optimizer, optim_state)
