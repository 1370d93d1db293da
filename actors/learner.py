"""The learner: N Ray actors that hold one sharded policy model and train it together.

:class:`LearnerWorker` is rank ``r`` of ``N`` in one ``torch.distributed`` process group
(gloo on CPU, NCCL on GPU). It loads the model with transformers and shards it with FSDP2
(``fully_shard`` on each decoder block, then on the root; ``learner.backend=fsdp2``) or
hands it to DeepSpeed ZeRO (``learner.backend=deepspeed``, ``learner.zero_stage``).
Parameters are float32 masters; a rank whose ``learner.dtype`` resolves to bfloat16
(``auto``: on CUDA or a CPU with native bf16, :mod:`shuffle_r1.precision`) computes in bf16
(FSDP2 ``MixedPrecisionPolicy`` with float32 gradient reduction; DeepSpeed ``bf16``).

A vision-language model (Qwen2.5-VL) is sharded the same way — its ``_no_split_modules`` name
both the decoder layers and the vision blocks, so each gets its own FSDP2 unit; the patch
embedding, the merger, the embeddings and the head stay in the root unit. With
``learner.freeze_vision_tower`` (the paper's recipe) the vision tower's parameters do not
require gradients and the optimizer holds only the trainable ones; the root unit then mixes
frozen and trainable parameters, which FSDP2 handles (it reduces the gradients that exist).
A rank runs the processor on the batch's image bytes itself (``pixel_values``,
``image_grid_thw``; the model derives its 3-D mRoPE positions from them), and every forward
runs the vision tower on every rank — a micro-batch without an image gets
:func:`~shuffle_r1.training.vision_filler` — since each vision block all-gathers its
parameters in its forward.

:class:`LearnerGroup` is the single controller the trainer calls. It cuts a
:class:`~shuffle_r1.training.TrainBatch` as docs/ALGORITHM.md §3.4 says — mini-batches in order,
each into contiguous pair-aligned shards, one per rank, each into micro-batches — and
averages the metrics. Every rank runs the same number of micro-batches (a short shard is
padded with rollouts that carry no signal), so the ranks' collectives stay in step.

The math lives in :mod:`shuffle_r1.training` (batch layout, log-probs, splits) and
:mod:`shuffle_r1.algos` (policy loss); this module owns processes, devices and state.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from torch import Tensor

from actors.metrics import ray_metric
from shuffle_r1.algos import policy_loss
from shuffle_r1.config import Config
from shuffle_r1.data.images import vision_inputs
from shuffle_r1.integrity import (
    CheckpointRejectedError,
    CheckpointWriteError,
    check_files,
    full_disk_error,
)
from shuffle_r1.models import load_policy_model
from shuffle_r1.net import free_port
from shuffle_r1.precision import resolve_dtype
from shuffle_r1.training import (
    TrainBatch,
    collate,
    microbatch_count,
    microbatch_slices,
    minibatch_slices,
    padding_batch,
    pair_aligned_shards,
    rollouts_per_optimizer_step,
    token_logprobs,
    vision_filler,
)

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
LOSS_METRICS = ("policy_loss", "pg_loss", "kl", "clip_fraction", "approx_kl")
VISION_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
# Files of a model folder that a checkpoint does not copy: it writes its own weights/config.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".index.json")
_PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
_WRITE_ADVICE = (
    "Not a learner failure: free space (or raise the quota, or make the folder writable), "
    "then continue with `shuffle-r1 train --resume`."
)


class LearnerFailedError(RuntimeError):
    """A rank of a :class:`LearnerGroup` failed (raised, or its process died); the group has
    killed every rank. Build a new group (from a checkpoint) to go on."""


class LearnerWorker:
    """Rank ``rank`` of ``world_size``: one shard of the policy model and its optimizer.

    Created by :class:`LearnerGroup` as a Ray actor (1 CPU, ``learner.num_gpus_per_rank``
    GPUs). Call order: :meth:`master_address` on rank 0, then :meth:`setup` on every rank
    at once (it blocks until all ranks joined). Every other method except :meth:`ping` is
    collective: all ranks must call it with their own shard, in the same order.
    """

    def __init__(self, rank: int, world_size: int, cfg: Config, model_path: str) -> None:
        self.rank = rank
        self.world_size = world_size
        self.cfg = cfg
        self.model_path = model_path
        use_cuda = cfg.learner.num_gpus_per_rank > 0
        self.device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        self.dtype = resolve_dtype(cfg.learner.dtype, cuda=use_cuda).dtype  # where it runs
        self.model: Any = None  # the FSDP2 module or the DeepSpeed engine, called alike
        self.optimizer: Any = None
        self._m_micro = ray_metric("shuffle_r1_learner_worker_microbatches_total")
        self._m_tokens = ray_metric("shuffle_r1_learner_worker_tokens_total")
        self._m_step = ray_metric("shuffle_r1_learner_worker_step_seconds")
        for metric in (self._m_micro, self._m_tokens, self._m_step):
            metric.set_default_tags({"rank": str(rank), "run": cfg.trainer.run_name})
        # vision-language models only: the image processor, <|image_pad|>'s id, the filler
        self.image_processor: Any = None
        self.image_token_id = -1
        self.filler: TrainBatch | None = None

    def master_address(self) -> tuple[str, int]:
        """This node's IP and a free TCP port for the process group's rendezvous (rank 0)."""
        return ray.util.get_node_ip_address(), free_port("")

    def setup(self, master_addr: str, master_port: int) -> None:
        """Join the process group, load the model, shard it, build the optimizer.

        Every rank loads the full model to CPU first (peak memory: one float32 copy per
        rank), then keeps its shard. A vision-language model also gets its processor and,
        with ``learner.freeze_vision_tower``, a frozen vision tower (module doc).
        """
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",  # each actor sees only its own device
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            "nccl" if self.device.type == "cuda" else "gloo",
            init_method=f"tcp://{master_addr}:{master_port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=_PROCESS_GROUP_TIMEOUT,
        )
        le = self.cfg.learner
        model: Any = load_policy_model(self.model_path, dtype=torch.float32)
        model.config.use_cache = False
        if hasattr(model.config, "vision_config"):
            self._setup_vision(model)
        if le.gradient_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        model.to(self.device)
        if le.backend == "fsdp2":
            self._setup_fsdp2(model)
        else:
            self._setup_deepspeed(model)

    def _setup_vision(self, model: Any) -> None:
        from shuffle_r1.processor import load_processor

        config = model.config
        self.image_processor = load_processor(self.model_path).image_processor
        self.image_token_id = config.image_token_id
        self.filler = vision_filler(
            self.image_processor,
            {
                "vision_start": config.vision_start_token_id,
                "image_pad": config.image_token_id,
                "vision_end": config.vision_end_token_id,
            },
        )
        if self.cfg.learner.freeze_vision_tower:
            model.model.visual.requires_grad_(False)

    def _setup_fsdp2(self, model: torch.nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        le = self.cfg.learner
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
        self.optimizer = torch.optim.AdamW(
            _trainable(model), lr=le.lr, weight_decay=le.weight_decay
        )

    def _setup_deepspeed(self, model: torch.nn.Module) -> None:
        import deepspeed

        le = self.cfg.learner
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
        optimizer = torch.optim.AdamW(_trainable(model), lr=le.lr, weight_decay=le.weight_decay)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=config, dist_init_required=False
        )

    # -- log-probs and training --------------------------------------------------------------

    def _inputs(self, batch: TrainBatch) -> dict[str, Tensor]:
        """Model inputs of a micro-batch (:func:`collate`); for a vision-language model also
        the vision inputs, after appending the filler to a micro-batch without an image
        (module doc; its rows come last and carry no signal)."""
        if self.filler is not None and not batch.has_images:
            batch = batch.concat(self.filler)
        inputs = collate(batch)
        if self.filler is not None:
            inputs.update(
                vision_inputs(
                    batch.images, inputs["input_ids"], self.image_processor, self.image_token_id
                )
            )
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _logprobs(self, inputs: dict[str, Tensor]) -> Tensor:
        vision = {k: inputs[k] for k in VISION_KEYS if k in inputs}
        return token_logprobs(
            self.model,
            inputs["input_ids"],
            inputs["attention_mask"],
            None if vision else inputs["position_ids"],  # VL: the model's own mRoPE positions
            inputs["response_start"],
            inputs["response_mask"],
            temperature=self.cfg.rollout.temperature,
            vision=vision,
        )

    def _micro_batches(self, shard: TrainBatch, count: int) -> list[tuple[bool, TrainBatch]]:
        """``count`` micro-batches of the shard, ``(is_real, batch)``; padding fills the tail."""
        slices = microbatch_slices(len(shard), self.cfg.learner.micro_batch_size, count)
        return [
            (s.stop > s.start, shard.select(s) if s.stop > s.start else padding_batch())
            for s in slices
        ]

    @torch.no_grad()
    def compute_logprobs(self, shard: TrainBatch, count: int) -> Tensor:
        """Log-probs ``(len(shard), shard.max_response_len)`` (nats, CPU float32) of the
        shard's response tokens, 0 past each response; ``count`` micro-batches (collective).
        """
        self.model.eval()
        out = torch.zeros(len(shard), shard.max_response_len)
        start = 0
        for real, micro in self._micro_batches(shard, count):
            self._m_micro.inc(1, tags={"kind": "logprobs"})
            logprobs = self._logprobs(self._inputs(micro))[: len(micro)].cpu()
            if real:
                width = min(out.shape[1], logprobs.shape[1])
                out[start : start + len(micro), :width] = logprobs[:, :width]
                start += len(micro)
        return out

    def train_step(self, shard: TrainBatch, count: int) -> dict[str, Any]:
        """One optimizer step on this rank's shard of a mini-batch (collective).

        The shard runs as ``count`` micro-batches; each micro-batch's policy loss
        (``algorithm.loss_agg_mode`` mean over its tokens, docs/ALGORITHM.md §4) is scaled by
        ``1/count`` and back-propagated; FSDP2/ZeRO average the gradients over the ranks,
        so every micro-batch weighs ``1/(count·N)`` in the step (EasyR1's accumulation).
        Then the gradient norm is clipped to ``learner.grad_clip`` and AdamW steps; a
        non-finite norm skips the step (FSDP2; DeepSpeed steps regardless).

        Returns:
            ``micro``: a list of per-micro-batch loss metrics (floats, real micro-batches
            only); ``grad_norm`` (float, before clipping); ``lr``; ``stepped`` (bool).
        """
        alg = self.cfg.algorithm
        started = time.perf_counter()
        self.model.train()
        records = []
        for real, micro in self._micro_batches(shard, count):
            self._m_micro.inc(1, tags={"kind": "train"})
            inputs = self._inputs(micro)
            logprobs = self._logprobs(inputs)
            old = inputs.get("old_logprobs")
            out = policy_loss(
                logprobs,
                # on-policy (LearnerGroup.update with old_logprobs=None): these very weights
                # drew the batch, so their log-probs are the old ones
                logprobs.detach() if old is None else old,
                inputs["advantages"],
                inputs["response_mask"],
                clip_ratio_low=alg.clip_ratio_low,
                clip_ratio_high=alg.clip_ratio_high,
                loss_agg_mode=alg.loss_agg_mode,
                ref_logprobs=inputs.get("ref_logprobs"),
                kl_coef=alg.kl_coef,
                kl_type=alg.kl_type,
            )
            loss = out.loss / count
            if self.cfg.learner.backend == "deepspeed":
                self.model.backward(loss, scale_wrt_gas=False)
            else:
                loss.backward()
            if real:
                values = (out.loss, out.pg_loss, out.kl, out.clip_fraction, out.approx_kl)
                records.append(
                    {k: float(v.detach()) for k, v in zip(LOSS_METRICS, values, strict=True)}
                )
        grad_norm, stepped = self._optimizer_step()
        tokens = sum(len(r) for r in shard.response_token_ids)
        if tokens:
            self._m_tokens.inc(tokens)
        self._m_step.observe(time.perf_counter() - started)
        lr = self.optimizer.param_groups[0]["lr"]
        return {"micro": records, "grad_norm": grad_norm, "lr": lr, "stepped": stepped}

    def _optimizer_step(self) -> tuple[float, bool]:
        if self.cfg.learner.backend == "deepspeed":
            self.model.step()
            norm = self.model.get_global_grad_norm()
            return float("nan") if norm is None else float(norm), True
        from torch.distributed.tensor import DTensor

        max_norm = self.cfg.learner.grad_clip or math.inf  # 0 = measure only
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

    # -- weights and checkpoints ---------------------------------------------------------------

    def full_state_dict(self, dtype: str | None = None) -> dict[str, Tensor] | None:
        """The full model state on CPU (collective): a dict on rank 0, ``None`` elsewhere.

        ``dtype`` (``"bfloat16"``/``"float32"``) casts floating tensors; ``None`` keeps the
        master dtype. Keys are the transformers names (``model.layers.0...``).
        """
        if self.cfg.learner.backend == "fsdp2":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state: dict[str, Any] = get_model_state_dict(self.model, options=options)
        elif self.cfg.learner.zero_stage == 3:
            state = self.model._zero3_consolidated_16bit_state_dict()
        else:
            state = self.model.module.state_dict() if self.rank == 0 else {}
        if self.rank != 0:
            return None
        cast = DTYPES[dtype] if dtype else None
        state = {
            k: (v.to("cpu", cast) if cast is not None and v.is_floating_point() else v.cpu())
            for k, v in state.items()
        }
        # Tied parameters (input/output embeddings) come back as separate copies; make them
        # one tensor again, so the object store and save_pretrained hold them once.
        module = self.model.module if self.cfg.learner.backend == "deepspeed" else self.model
        first: dict[int, str] = {}
        for name, param in module.named_parameters(remove_duplicate=False):
            if id(param) in first and name in state:
                state[name] = state[first[id(param)]]
            first.setdefault(id(param), name)
        return state

    def publish(self, dtype: str) -> list[ray.ObjectRef] | None:
        """Put the full state dict (cast to ``dtype``) into the object store once, from rank
        0 (collective). Rank 0 returns ``[ref]``, the others ``None``."""
        state = self.full_state_dict(dtype)
        return None if state is None else [ray.put(state)]

    def save_checkpoint(self, directory: str, version: int) -> None:
        """Save to ``directory`` (collective; a folder every rank can reach):

        - ``model/``: the full model in transformers format (float32 masters), with the
          tokenizer and other non-weight files of the source folder — loadable by
          ``from_pretrained`` and vLLM;
        - ``optimizer/`` (FSDP2): the sharded AdamW state via ``torch.distributed.checkpoint``
          (reshardable to another rank count); ``deepspeed/`` (DeepSpeed): its own checkpoint;
        - ``learner.json``: the weight version, backend and rank count.

        Raises:
            CheckpointWriteError: a write failed for lack of space, quota or permission
                (``shuffle_r1.integrity.OPERATOR_ERRNOS``), here or, through the collective
                save, on another rank.
        """
        try:
            self._write_checkpoint(Path(directory), version)
        except BaseException as exc:  # dcp's CheckpointException is a BaseException
            error = full_disk_error(exc, Path(directory))
            if error is None:
                raise
            raise CheckpointWriteError.wrap(
                error,
                f"learner rank {self.rank} saving checkpoint {directory}",
                Path(directory),
                _WRITE_ADVICE,
            ) from exc

    def _write_checkpoint(self, root: Path, version: int) -> None:
        state = self.full_state_dict()
        if self.rank == 0:
            model_dir = root / "model"
            model_dir.mkdir(parents=True, exist_ok=True)
            module = self.model.module if self.cfg.learner.backend == "deepspeed" else self.model
            module.save_pretrained(model_dir, state_dict=state)
            _copy_non_weight_files(Path(self.model_path), model_dir)
        del state
        if self.cfg.learner.backend == "fsdp2":
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            optim_state = get_optimizer_state_dict(self.model, self.optimizer)
            dcp.save({"optimizer": optim_state}, checkpoint_id=str(root / "optimizer"))
        else:
            self.model.save_checkpoint(str(root / "deepspeed"), tag="learner")
        dist.barrier()
        if self.rank == 0:
            meta = {"version": version, "backend": self.cfg.learner.backend}
            meta["num_ranks"] = self.world_size
            (root / "learner.json").write_text(json.dumps(meta))

    def check_checkpoint(self, directory: str, files: dict[str, dict[str, Any]]) -> list[str]:
        """What differs between ``directory`` as this rank sees it and ``files`` (a verified
        manifest's entries, ``shuffle_r1.integrity.file_digests``); empty when it matches.
        Every file's presence and size, and the SHA-256 of this rank's share of the files
        (``check_files``): the ranks together read the checkpoint once. Not collective."""
        return check_files(Path(directory), files, share=(self.rank, self.world_size))

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        """Restore model and optimizer from :meth:`save_checkpoint`'s folder (collective);
        returns its ``learner.json``. The loaders unpickle: call it only after
        :meth:`check_checkpoint` passed on every rank (``LearnerGroup.load_checkpoint``).
        Raises ``FileNotFoundError`` if it is incomplete."""
        root = Path(directory)
        meta_path = root / "learner.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} is missing: {root} is not a complete checkpoint")
        meta = json.loads(meta_path.read_text())
        if meta["backend"] != self.cfg.learner.backend:
            raise ValueError(
                f"checkpoint {root} was written by learner.backend={meta['backend']!r}; "
                f"this learner runs {self.cfg.learner.backend!r}"
            )
        if self.cfg.learner.backend == "deepspeed":
            path, _ = self.model.load_checkpoint(str(root / "deepspeed"), tag="learner")
            if path is None:
                raise FileNotFoundError(f"no DeepSpeed checkpoint under {root / 'deepspeed'}")
            return meta
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = {}
        if self.rank == 0:
            full = load_policy_model(root / "model", dtype=torch.float32).state_dict()
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(self.model, full, options=options)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load({"optimizer": optim_state}, checkpoint_id=str(root / "optimizer"))
        set_optimizer_state_dict(self.model, self.optimizer, optim_state)
        return meta

    def ping(self) -> dict[str, Any]:
        """Liveness: rank, pid, device (not collective)."""
        return {"rank": self.rank, "pid": os.getpid(), "device": str(self.device)}

    def shutdown(self) -> None:
        """Leave the process group (collective when the group is healthy)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the optimizer updates (a frozen vision tower's are left out)."""
    return [p for p in model.parameters() if p.requires_grad]


def _copy_non_weight_files(source: Path, target: Path) -> None:
    """Copy tokenizer, chat template and similar files from a model folder into a checkpoint."""
    if not source.is_dir():
        return
    for path in source.iterdir():
        keep = path.is_file() and not path.name.startswith(".") and path.name != "config.json"
        if keep and not path.name.endswith(_WEIGHT_SUFFIXES) and not (target / path.name).exists():
            shutil.copy2(path, target / path.name)


class LearnerGroup:
    """N :class:`LearnerWorker` ranks driven as one learner (the trainer's single controller).

    Args:
        cfg: the run's config; reads ``learner`` (ranks, backend, optimizer, batch sizes),
            ``algorithm`` (loss, α for the mini-batch size), ``rollout.n`` and
            ``rollout.temperature`` (log-probs are ``log_softmax(logits / T)``).
        model_path: a transformers folder every rank can read; default
            ``shuffle_r1.models.resolve_model_path(cfg.learner.model_path)``.

    Needs a running Ray with ``learner.num_ranks`` free CPUs (and GPUs when
    ``learner.num_gpus_per_rank > 0``). If a rank fails, the group kills every rank (the
    others would wait on it in a collective) and raises :class:`LearnerFailedError`; build a
    new group to go on.

    Attributes:
        version: the weight version: 0 as loaded (or the checkpoint's), +1 per :meth:`update`
            that stepped the optimizer.
        last_publish_s: seconds the last :meth:`publish_weights` took.
    """

    def __init__(self, cfg: Config, model_path: str | Path | None = None) -> None:
        if model_path is None:
            from shuffle_r1.models import resolve_model_path

            model_path = resolve_model_path(cfg.learner.model_path)
        self.cfg = cfg
        self.model_path = str(model_path)
        self.version = 0
        self.last_publish_s = 0.0
        self._published: tuple[int, ray.ObjectRef] | None = None
        rollout_on_cuda = cfg.rollout.num_gpus_per_worker > 0
        self.publish_dtype = resolve_dtype(cfg.rollout.dtype, cuda=rollout_on_cuda).dtype
        le = cfg.learner
        actor = ray.remote(LearnerWorker).options(
            num_cpus=1, num_gpus=le.num_gpus_per_rank, resources=dict(le.ray_resources) or None
        )
        # Actor handles: their methods are typed by Ray at run time only.
        self.workers: list[Any] = [
            actor.remote(rank, le.num_ranks, cfg, self.model_path) for rank in range(le.num_ranks)
        ]
        started = time.perf_counter()
        address = self._gather([self.workers[0].master_address.remote()])[0]
        self._gather([w.setup.remote(*address) for w in self.workers])
        logger.info(
            "learner: %d %s ranks on %s ready in %.1f s",
            le.num_ranks,
            le.backend,
            self.model_path,
            time.perf_counter() - started,
        )

    @property
    def rollouts_per_minibatch(self) -> int:
        """Rollouts per optimizer step (``training.rollouts_per_optimizer_step``, α-scaled)."""
        return rollouts_per_optimizer_step(
            self.cfg.learner.global_batch_size,
            self.cfg.rollout.n,
            self.cfg.algorithm.effective_keep_ratio,
        )

    def _gather(self, refs: list[ray.ObjectRef]) -> list[Any]:
        """Results in order; on the first failure kill every rank and raise."""
        pending = list(refs)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)
        except Exception as exc:
            self.shutdown(graceful=False)
            raise LearnerFailedError(
                f"a learner rank failed; the learner group is shut down: {exc}"
            ) from exc
        return ray.get(refs)

    def _run(self, method: str, batch: TrainBatch) -> list[tuple[slice, Any]]:
        """Call ``method(shard, count)`` on every rank with its pair-aligned shard."""
        if not self.workers:
            raise RuntimeError("the learner group is shut down")
        shards = pair_aligned_shards(len(batch), len(self.workers))
        count = microbatch_count(
            [s.stop - s.start for s in shards], self.cfg.learner.micro_batch_size
        )
        refs = [
            getattr(w, method).remote(batch.select(s), count)
            for w, s in zip(self.workers, shards, strict=True)
        ]
        return list(zip(shards, self._gather(refs), strict=True))

    def compute_logprobs(self, batch: TrainBatch) -> Tensor:
        """Log-probs ``(B, L)`` (nats, float32, CPU) of the response tokens under the current
        weights, ``L = batch.max_response_len``, 0 past each response. The batch is split
        across the ranks in contiguous pair-aligned shards; rows come back in order.

        Raises:
            ValueError: the batch has an odd number of rollouts (pairs cannot be kept whole).
        """
        out = torch.zeros(len(batch), batch.max_response_len)
        for rows, part in self._run("compute_logprobs", batch):
            out[rows, : part.shape[1]] = part
        return out

    def single_step(self, num_rollouts: int) -> bool:
        """Whether an update on ``num_rollouts`` rollouts is one optimizer step on the current
        weights (one mini-batch, ``learner.ppo_epochs`` = 1). Then every micro-batch's forward
        pass runs on the weights that would compute the old log-probs, so :meth:`update` may
        take them from that pass (``old_logprobs=None``) and skip a forward pass over the
        batch; the loss and the gradient are the same."""
        return self.cfg.learner.ppo_epochs == 1 and num_rollouts <= self.rollouts_per_minibatch

    def update(
        self,
        batch: TrainBatch,
        old_logprobs: Tensor | None,
        minibatches: list[list[int]] | None = None,
    ) -> dict[str, float]:
        """Train on ``batch`` (docs/ALGORITHM.md §3.4, §4): ``learner.ppo_epochs`` passes over its
        mini-batches, in order; one optimizer step each, split across ranks and
        micro-batches (see ``LearnerWorker.train_step``). The mini-batches are
        ``minibatches`` when given, else consecutive runs of :attr:`rollouts_per_minibatch`
        rollouts.

        Args:
            batch: rollouts, pairs adjacent; ``batch.ref_logprobs`` is needed when
                ``algorithm.kl_coef > 0``.
            old_logprobs: ``(B, L)`` log-probs of the batch under the weights it was drawn
                with, as :meth:`compute_logprobs` returns them; None when
                :meth:`single_step` holds: the update's own forward pass gives them
                (detached; the ratio is exactly 1).
            minibatches: the rows of each optimizer mini-batch (an ABS batch's layout,
                ``shuffle_r1.training.abs_minibatch_rows``); both rollouts of a pair in one.

        Returns:
            means over micro-batches of ``policy_loss``, ``pg_loss``, ``kl``,
            ``clip_fraction``, ``approx_kl``; mean ``grad_norm`` over optimizer steps
            (before clipping); ``num_optimizer_steps`` (steps taken; a non-finite gradient
            skips one); ``lr``.

        Raises:
            ValueError: an empty or odd-sized batch, ``kl_coef > 0`` without ref log-probs,
                or ``old_logprobs=None`` for more than one optimizer step.
        """
        if len(batch) == 0:
            raise ValueError("update() got an empty batch; skip the update instead")
        one_step = self.single_step(len(batch)) and (minibatches is None or len(minibatches) < 2)
        if old_logprobs is None and batch.old_logprobs is None and not one_step:
            raise ValueError(
                f"update() without old_logprobs needs one optimizer step, but {len(batch)} "
                f"rollouts make {math.ceil(len(batch) / self.rollouts_per_minibatch)} "
                f"mini-batches x {self.cfg.learner.ppo_epochs} epochs: later steps run on "
                "updated weights; pass compute_logprobs(batch)"
            )
        if self.cfg.algorithm.kl_coef > 0 and batch.ref_logprobs is None:
            raise ValueError(
                f"algorithm.kl_coef={self.cfg.algorithm.kl_coef} needs batch.ref_logprobs"
            )
        if old_logprobs is not None:
            batch = batch.with_logprobs(old=old_logprobs)
        records: list[dict[str, float]] = []
        norms, steps, lr = [], 0, float("nan")
        for _ in range(self.cfg.learner.ppo_epochs):
            cuts = minibatches or minibatch_slices(len(batch), self.rollouts_per_minibatch)
            for rows in cuts:
                results = [r for _, r in self._run("train_step", batch.select(rows))]
                records.extend(m for r in results for m in r["micro"])
                norms.append(results[0]["grad_norm"])
                steps += int(results[0]["stepped"])
                lr = results[0]["lr"]
        if steps:
            self.version += 1
        metrics = {k: sum(r[k] for r in records) / len(records) for k in LOSS_METRICS}
        metrics.update(grad_norm=sum(norms) / len(norms), num_optimizer_steps=float(steps), lr=lr)
        return metrics

    def publish_weights(self) -> tuple[int, ray.ObjectRef]:
        """``(version, ref)``: the full state dict put into the object store once, from rank
        0: CPU tensors, keys as in transformers, in the rollout engines' dtype
        (:attr:`publish_dtype`; a bf16 copy would round away updates a float32 engine can
        use). A second call at the same version returns the same ref. The time taken is in
        :attr:`last_publish_s`.
        """
        if self._published is not None and self._published[0] == self.version:
            return self._published
        started = time.perf_counter()
        results = self._gather([w.publish.remote(self.publish_dtype) for w in self.workers])
        self._published = (self.version, results[0][0])
        self.last_publish_s = time.perf_counter() - started
        return self._published

    def save_checkpoint(self, directory: str | Path) -> None:
        """Write model, optimizer and version to ``directory`` (layout:
        ``LearnerWorker.save_checkpoint``); a folder every rank can reach.

        Raises:
            CheckpointWriteError: a rank could not write for lack of space, quota or
                permission; an operator error, not a learner failure (the ranks are stopped,
                as after any failure of a collective).
            LearnerFailedError: a rank failed otherwise.
        """
        refs = [w.save_checkpoint.remote(str(directory), self.version) for w in self.workers]
        try:
            self._gather(refs)
        except LearnerFailedError as exc:
            # Ray delivers the rank's error as a RayTaskError whose ``cause`` it is
            error = full_disk_error(exc, Path(directory))
            if isinstance(error, CheckpointWriteError):
                raise error from exc
            if error is not None:
                raise CheckpointWriteError.wrap(
                    error, f"saving checkpoint {directory}", Path(directory), _WRITE_ADVICE
                ) from exc
            raise

    def load_checkpoint(self, directory: str | Path, files: dict[str, dict[str, Any]]) -> None:
        """Restore model, optimizer and version from ``directory``; any rank count may load it
        (FSDP2; DeepSpeed needs the same).

        ``files`` are the expected files of ``directory`` from its checkpoint's verified
        manifest (``services.trainer.state.files_under``). Every rank first checks the folder
        as it sees it (``LearnerWorker.check_checkpoint``: a rank on another node may see
        another copy); only when all match does any rank deserialise anything.

        Raises:
            CheckpointRejectedError: a rank found a file missing, extra, or different; nothing
                was loaded and the group is unchanged.
        """
        refs = [w.check_checkpoint.remote(str(directory), files) for w in self.workers]
        found = [f"rank {r}: {p}" for r, ps in enumerate(self._gather(refs)) for p in ps]
        if found:
            more = f" (and {len(found) - 5} more)" if len(found) > 5 else ""
            raise CheckpointRejectedError(
                f"checkpoint {directory} does not match its manifest as the learner ranks see "
                f"it: {'; '.join(found[:5])}{more}; nothing was loaded"
            )
        metas = self._gather([w.load_checkpoint.remote(str(directory)) for w in self.workers])
        self.version = int(metas[0]["version"])
        self._published = None

    def shutdown(self, graceful: bool = True) -> None:
        """Stop every rank (idempotent). ``graceful`` first lets them leave the process group."""
        workers, self.workers = self.workers, []
        if graceful and workers:
            try:
                ray.get([w.shutdown.remote() for w in workers], timeout=60)
            except Exception as exc:  # a dead rank: kill the rest anyway
                logger.warning("learner shutdown: %s", exc)
        for w in workers:
            ray.kill(w)
