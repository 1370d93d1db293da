"""FSDP2: ``fully_shard`` on each block the model's ``_no_split_modules`` names (decoder layers,
and vision blocks of a vision-language model), then on the root; torch AdamW over the shards.

A checkpoint's optimizer state goes to ``optimizer/`` through ``torch.distributed.checkpoint``
(sharded, so any rank count may load it); the model is read back from ``model/``.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
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
from torch.distributed.tensor import DTensor, Shard

from actors.learner.backends import DTYPES, Backend
from actors.rollout.transport import FlatWeights, Layout, tied_names
from shuffle_r1.lora import ADAPTER_FILE
from shuffle_r1.models import load_policy_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _FlatPlan:
    """Where :meth:`FSDP2Backend.flat_state` puts each rank's rows.

    Attributes:
        key: the names, shapes, dtypes and shardings it was made for.
        layout: the buckets.
        rows: per row-sharded tensor: ``(first element, elements)`` of this rank's rows in
            it (other tensors go whole, from rank 0).
        buckets: the buckets in shared memory, mapped by every rank; ``None`` when the
            ranks are not all on one host.
    """

    key: Any
    layout: Layout
    rows: dict[str, tuple[int, int]]
    buckets: list[Tensor] | None


def _shared(paths: list[str], layout: Layout) -> list[Tensor]:
    """The buckets of ``layout`` mapped from the files ``paths`` (created if missing)."""
    return [
        torch.from_file(path, shared=True, size=n * _itemsize(d), dtype=torch.uint8).view(
            getattr(torch, d)
        )
        for path, d, n in zip(paths, layout.dtypes, layout.sizes, strict=True)
    ]


def _shm_free() -> int:
    """Bytes free in ``/dev/shm`` (0 where there is none)."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return stat.f_bavail * stat.f_frsize


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()


def _by_rows(value: Any) -> bool:
    """Whether ``value`` is a DTensor sharded by rows over a 1-D mesh (FSDP2's way)."""
    return (
        isinstance(value, DTensor)
        and value.device_mesh.ndim == 1
        and tuple(value.placements) == (Shard(0),)
    )


class FSDP2Backend(Backend):
    """FSDP2 with float32 gradient reduction; a non-finite gradient norm skips the step."""

    _plan: _FlatPlan | None = None
    _plans_made = 0

    def wrap(self, model: torch.nn.Module) -> None:
        self.model = self._shard(model)
        self.optimizer = self._adamw(model)

    def wrap_reference(self, model: torch.nn.Module) -> Any:
        return self._shard(model).eval()

    def _shard(self, model: torch.nn.Module) -> Any:
        """``fully_shard`` on every block ``_no_split_modules`` names, then on the root."""
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
        return model

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

    def flat_state(self, dtype: torch.dtype, times: dict[str, float]) -> FlatWeights | None:
        """Straight into the buckets, without a full state dict: the buckets are one
        shared-memory mapping per dtype on every rank (made once, :meth:`_flat_plan`), and
        each rank casts its own rows of every parameter into their place (``pack``), all
        ranks at once; a barrier, and rank 0 holds the whole state (``barrier``). FSDP2
        shards a parameter by rows (``Shard(0)``), rank ``r`` holding the ``r``-th run of
        them, so a rank's rows are one contiguous run of the bucket. Ranks on several hosts
        share no memory: they gather the full state dict instead (``Backend.flat_state``).
        """
        start = time.perf_counter()
        # FSDP2's state-dict hook registers every parameter as its sharded DTensor first;
        # keep_vars keeps tied names on one object
        state = self.model.state_dict(keep_vars=True)
        tied = tied_names(state)
        skip = {name for name, _ in tied}
        tensors = [(k, v) for k, v in state.items() if k not in skip]
        plan = self._flat_plan(tensors, tied, dtype)
        if plan.buckets is None:
            return super().flat_state(dtype, times)
        for entry, (_, value) in zip(plan.layout.entries, tensors, strict=True):
            bucket = plan.buckets[entry.bucket]
            if entry.name in plan.rows:
                at, n = plan.rows[entry.name]
                if n:
                    local = value.to_local().detach().reshape(-1)
                    bucket.narrow(0, entry.offset + at, n).copy_(local)
                continue
            # replicated, or sharded another way: whole, from rank 0
            whole = value.full_tensor() if isinstance(value, DTensor) else value
            if self.rank == 0:
                bucket.narrow(0, entry.offset, entry.numel).copy_(whole.detach().reshape(-1))
        times["pack"] = time.perf_counter() - start
        start = time.perf_counter()
        dist.barrier()  # every rank's rows are in place
        times["barrier"] = time.perf_counter() - start
        return FlatWeights(plan.layout, plan.buckets) if self.rank == 0 else None

    def _flat_plan(
        self, tensors: list[tuple[str, Any]], tied: list[tuple[str, str]], dtype: torch.dtype
    ) -> _FlatPlan:
        """Where :meth:`flat_state` puts this rank's rows, and the shared buckets: made on
        the first call (one exchange of shard sizes and host names) and again only when
        names, shapes or shardings change.

        The buckets are files in ``/dev/shm`` that rank 0 creates, every rank maps, and rank
        0 unlinks once all have mapped them: the memory stays shared and goes with the last
        process, whatever way it ends. Without twice their size free there (or with ranks on
        several hosts) there are no shared buckets and :meth:`flat_state` gathers."""
        key = (
            dtype,
            tuple(tied),
            tuple((k, tuple(v.shape), v.dtype, _by_rows(v)) for k, v in tensors),
        )
        if self._plan is not None and self._plan.key == key:
            return self._plan
        self._plan = None  # drop the old mapping first
        layout = Layout.of(((k, tuple(v.shape), v.dtype) for k, v in tensors), dtype, tied)
        mine = {k: v.to_local().numel() for k, v in tensors if _by_rows(v)}
        everyone: list[Any] = [None] * self.world_size
        need = sum(n * _itemsize(d) for d, n in zip(layout.dtypes, layout.sizes, strict=True))
        here = (socket.gethostname(), os.getpid(), mine, _shm_free())
        dist.all_gather_object(everyone, here)
        rows: dict[str, tuple[int, int]] = {}
        for entry in layout.entries:
            if entry.name not in mine:
                continue
            counts = [everyone[r][2][entry.name] for r in range(self.world_size)]
            if sum(counts) != entry.numel:
                raise RuntimeError(
                    f"{entry.name}: the ranks' shards hold {counts} elements, the parameter "
                    f"{entry.numel}; flat_state expects FSDP2's row shards"
                )
            rows[entry.name] = (sum(counts[: self.rank]), counts[self.rank])
        buckets = None
        # one host, and room in /dev/shm (a container's is often 64 MB; a write past it
        # would kill the rank with SIGBUS)
        if (
            self.cfg.publish_shared_memory
            and len({e[0] for e in everyone}) == 1
            and min(e[3] for e in everyone) > 2 * need
        ):
            # one name per learner group and layout: rank 0's pid and a count
            self._plans_made += 1
            stem = f"/dev/shm/shuffle-r1-weights-{everyone[0][1]}-{self._plans_made}"
            paths = [f"{stem}-{b}" for b in range(len(layout.dtypes))]
            if self.rank == 0:
                buckets = _shared(paths, layout)
            dist.barrier()
            if self.rank != 0:
                buckets = _shared(paths, layout)
            dist.barrier()
            if self.rank == 0:
                for path in paths:
                    os.unlink(path)
        self._plan = _FlatPlan(key, layout, rows, buckets)
        return self._plan

    def save_checkpoint(self, root: Path) -> None:
        optim_state = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.save({"optimizer": optim_state}, checkpoint_id=str(root / "optimizer"))

    def load_checkpoint(self, root: Path) -> None:
        full: dict[str, Any] = {}
        lora = self.cfg.lora_rank > 0  # the base weights are the model's own: adapters only
        if self.rank == 0:
            if lora:
                from safetensors.torch import load_file

                full = load_file(str(root / ADAPTER_FILE))
            else:
                full = load_policy_model(root / "model", dtype=torch.float32).state_dict()
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not lora)
        set_model_state_dict(self.model, full, options=options)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load({"optimizer": optim_state}, checkpoint_id=str(root / "optimizer"))
        set_optimizer_state_dict(self.model, self.optimizer, optim_state)
