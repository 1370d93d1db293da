"""One learner rank: :class:`LearnerWorker`, a Ray actor holding one shard of the policy model.

:class:`LearnerWorker` is rank ``r`` of ``N`` in one ``torch.distributed`` process group
(gloo on CPU, NCCL on GPU). It loads the model with transformers and hands it to its
backend (:mod:`actors.learner.backends`: FSDP2 or DeepSpeed ZeRO, ``learner.backend``), which
shards it and owns the optimizer. Parameters are float32 masters; a rank whose
``learner.dtype`` resolves to bfloat16 (``auto``: on CUDA or a CPU with native bf16,
:mod:`shuffle_r1.precision`) computes in bf16.

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
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed as dist
from torch import Tensor

from actors.learner.backends import DTYPES, make_backend
from actors.learner.memory import peak_memory_mb, reset_peak_memory
from actors.metrics import ray_metric
from actors.rollout.transport import FlatWeights, pack, tied_names
from shuffle_r1.algos import policy_loss
from shuffle_r1.config import Config
from shuffle_r1.data.images import vision_inputs
from shuffle_r1.integrity import CheckpointWriteError, check_files, full_disk_error
from shuffle_r1.lora import ADAPTER_FILE, add_lora, base_name, is_adapter, merge_lora_state
from shuffle_r1.models import load_policy_model
from shuffle_r1.net import free_port
from shuffle_r1.precision import resolve_dtype
from shuffle_r1.shared_prompt import collate_shared, shared_prompt_logprobs
from shuffle_r1.training import (
    TrainBatch,
    collate,
    padding_batch,
    token_logprobs,
    vision_filler,
)

# train_step's per-micro-batch metrics, from shuffle_r1.algos.loss.PolicyLossOutput
LOSS_METRICS = (
    "policy_loss",
    "pg_loss",
    "kl",
    "clip_fraction",
    "approx_kl",
    "behaviour_imp_weight",
    "behaviour_truncated_fraction",
)
VISION_KEYS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")
# Files of a model folder that a checkpoint does not copy: it writes its own weights/config.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth", ".index.json")
_PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
# The advice a CheckpointWriteError carries, raised by a rank or by the group.
WRITE_ADVICE = (
    "Not a learner failure: free space (or raise the quota, or make the folder writable), "
    "then continue with `shuffle-r1 train --resume`."
)


class LearnerWorker:
    """Rank ``rank`` of ``world_size``: one shard of the policy model and its optimizer.

    Created by :class:`LearnerGroup` as a Ray actor (``learner.threads_per_rank`` CPUs, which
    torch uses as its thread count; ``learner.num_gpus_per_rank`` GPUs). Call order:
    :meth:`master_address` on rank 0, then :meth:`setup` on every rank at once (it blocks
    until all ranks joined). Every other method except :meth:`ping` is
    collective: all ranks must call it with their own shard, in the same order.
    """

    def __init__(self, rank: int, world_size: int, cfg: Config, model_path: str) -> None:
        self.rank = rank
        self.world_size = world_size
        self.cfg = cfg
        self.model_path = model_path
        use_cuda = cfg.learner.num_gpus_per_rank > 0
        torch.set_num_threads(cfg.learner.threads_per_rank)
        self.device = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
        self.backend = make_backend(
            cfg.learner,
            rank=rank,
            world_size=world_size,
            device=self.device,
            dtype=resolve_dtype(cfg.learner.dtype, cuda=use_cuda).dtype,  # where it runs
            model_path=model_path,
        )
        self._m_micro = ray_metric("shuffle_r1_learner_worker_microbatches_total")
        self._m_tokens = ray_metric("shuffle_r1_learner_worker_tokens_total")
        self._m_step = ray_metric("shuffle_r1_learner_worker_step_seconds")
        for metric in (self._m_micro, self._m_tokens, self._m_step):
            metric.set_default_tags({"rank": str(rank), "run": cfg.trainer.run_name})
        # vision-language models only: the image processor, <|image_pad|>'s id, the filler
        self.image_processor: Any = None
        self.image_token_id = -1
        self.filler: TrainBatch | None = None
        # each distinct prompt of a micro-batch once (shuffle_r1/shared_prompt.py): text
        # models only, and the same on every rank (a forward is a collective); set in setup
        self.share_prompts = False
        # algorithm.kl_coef > 0: the reference policy (docs/algorithm.md §4), the initial
        # model frozen; None with LoRA, whose reference is the policy with its adapters off
        self.reference: Any = None
        self.lora = cfg.learner.lora_rank > 0

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
        else:
            self.share_prompts = le.share_prompts
        if le.gradient_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        if self.lora:  # the same adapter initialisation on every rank, and on a resume
            torch.manual_seed(self.cfg.trainer.seed)
            model = add_lora(model, le)
        model.to(self.device)
        self.backend.wrap(model)
        if self.cfg.algorithm.kl_coef > 0 and not self.lora:
            reference: Any = load_policy_model(self.model_path, dtype=torch.float32)
            reference.config.use_cache = False
            reference.requires_grad_(False)
            self.reference = self.backend.wrap_reference(reference.to(self.device))

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

    # -- log-probs and training --------------------------------------------------------------

    def _inputs(self, batch: TrainBatch) -> dict[str, Tensor]:
        """Model inputs of a micro-batch: for a text model with ``learner.share_prompts``, its
        distinct prompts and the responses (:func:`collate_shared`), else the full rows
        (:func:`collate`); for a vision-language model also the vision inputs, after
        appending the filler to a micro-batch without an image (module doc; its rows come
        last and carry no signal)."""
        if self.share_prompts:
            inputs = collate_shared(batch)
            return {k: v.to(self.device) for k, v in inputs.items()}
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

    def _logprobs(self, inputs: dict[str, Tensor], model: Any = None) -> Tensor:
        """Response log-probs of a micro-batch's ``inputs`` under ``model`` (the policy if
        None), at the rollouts' temperature."""
        model = self.backend.model if model is None else model
        temperature = self.cfg.rollout.temperature
        if self.share_prompts:
            return shared_prompt_logprobs(model, inputs, temperature)
        vision = {k: inputs[k] for k in VISION_KEYS if k in inputs}
        return token_logprobs(
            model,
            inputs["input_ids"],
            inputs["attention_mask"],
            None if vision else inputs["position_ids"],  # VL: the model's own mRoPE positions
            inputs["response_start"],
            inputs["response_mask"],
            temperature=temperature,
            vision=vision,
        )

    def _micro_batches(
        self, shard: TrainBatch, plan: list[list[int]]
    ) -> list[tuple[list[int], TrainBatch]]:
        """The shard's micro-batches, ``(rows, batch)``, one per entry of ``plan`` (rows of the
        shard, ``minibatches.microbatch_plans``); an empty entry is a padding micro-batch."""
        return [(rows, shard.select(rows) if rows else padding_batch()) for rows in plan]

    @torch.no_grad()
    def compute_logprobs(
        self, shard: TrainBatch, plan: list[list[int]], reference: bool = False
    ) -> Tensor:
        """Log-probs ``(len(shard), shard.max_response_len)`` (nats, CPU float32) of the
        shard's response tokens, 0 past each response; micro-batches ``plan`` (collective).
        ``reference``: under the reference policy instead (``algorithm.kl_coef > 0``): the
        frozen initial model, or with LoRA the policy with its adapters disabled.
        Only with ``algorithm.kl_coef > 0`` (``LearnerGroup.compute_logprobs`` checks).
        """
        self.backend.model.eval()
        model = self.reference if reference else None
        adapters_off = (
            self.backend.module.disable_adapter() if reference and self.lora else nullcontext()
        )
        out = torch.zeros(len(shard), shard.max_response_len)
        with adapters_off:
            for rows, micro in self._micro_batches(shard, plan):
                self._m_micro.inc(1, tags={"kind": "ref_logprobs" if reference else "logprobs"})
                logprobs = self._logprobs(self._inputs(micro), model)[: len(micro)].cpu()
                if rows:
                    width = min(out.shape[1], logprobs.shape[1])
                    out[rows, :width] = logprobs[:, :width]
        return out

    def _weights(self, shard: TrainBatch, plan: list[list[int]]) -> list[float]:
        """Each micro-batch's weight in the rank's gradient (docs/algorithm.md §4).

        Micro-batches of ``learner.micro_batch_size`` rows: ``1/count`` each (EasyR1's
        accumulation). Under ``learner.micro_batch_tokens`` (micro-batches of unequal size):
        the micro-batch's share of the shard's response tokens for ``token-mean``, of its
        rows for ``seq-mean-token-mean``, so the rank's loss is the shard's token (or
        sequence) mean however the shard was cut. Padding micro-batches weigh 0.
        """
        if self.cfg.learner.micro_batch_tokens <= 0:
            return [1.0 / len(plan)] * len(plan)
        if self.cfg.algorithm.loss_agg_mode == "token-mean":
            sizes = [sum(len(shard.response_token_ids[i]) for i in rows) for rows in plan]
        else:
            sizes = [len(rows) for rows in plan]
        total = sum(sizes)
        return [size / total if total else 0.0 for size in sizes]

    def train_step(self, shard: TrainBatch, plan: list[list[int]]) -> dict[str, Any]:
        """One optimizer step on this rank's shard of a mini-batch (collective).

        The shard runs as the micro-batches ``plan`` (rows of the shard; an empty entry is a
        padding micro-batch); each micro-batch's policy loss (``algorithm.loss_agg_mode``
        mean over its tokens, docs/algorithm.md §4) is scaled by its weight
        (:meth:`_weights`: ``1/count`` for micro-batches of ``learner.micro_batch_size``)
        and back-propagated; FSDP2/ZeRO average the gradients over the ranks. Then the
        gradient norm is clipped to ``learner.grad_clip`` and AdamW steps; a non-finite norm
        skips the step (FSDP2; DeepSpeed steps regardless).

        Returns:
            ``micro``: a list of per-micro-batch loss metrics (floats, real micro-batches
            only); ``grad_norm`` (float, before clipping); ``lr``; ``stepped`` (bool);
            ``peak_memory_mb``, the largest peak of any micro-batch (resident set on CPU,
            allocated on CUDA; :func:`~actors.learner.memory.peak_memory_mb`).
        """
        alg = self.cfg.algorithm
        started = time.perf_counter()
        self.backend.model.train()
        records = []
        peak = 0.0
        for (rows, micro), weight in zip(
            self._micro_batches(shard, plan), self._weights(shard, plan), strict=True
        ):
            self._m_micro.inc(1, tags={"kind": "train"})
            reset_peak_memory(self.device)
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
                # rollouts sampled by older weights (docs/algorithm.md §4, "Off-policy rollouts")
                behaviour_logprobs=inputs.get("behaviour_logprobs"),
                behaviour_imp_cap=alg.behaviour_imp_cap,
            )
            self.backend.backward(out.loss * weight)
            peak = max(peak, peak_memory_mb(self.device))
            if rows:
                values = (
                    out.loss,
                    out.pg_loss,
                    out.kl,
                    out.clip_fraction,
                    out.approx_kl,
                    out.behaviour_imp_weight,
                    out.behaviour_truncated_fraction,
                )
                records.append(
                    {k: float(v.detach()) for k, v in zip(LOSS_METRICS, values, strict=True)}
                )
        grad_norm, stepped = self.backend.step()
        tokens = sum(len(r) for r in shard.response_token_ids)
        if tokens:
            self._m_tokens.inc(tokens)
        self._m_step.observe(time.perf_counter() - started)
        lr = self.backend.optimizer.param_groups[0]["lr"]
        return {
            "micro": records,
            "grad_norm": grad_norm,
            "lr": lr,
            "stepped": stepped,
            "peak_memory_mb": peak,
        }

    # -- weights and checkpoints ---------------------------------------------------------------

    def full_state_dict(self, merged: bool = True) -> dict[str, Tensor] | None:
        """The full model state on CPU in the master dtype (collective): a dict on rank 0,
        ``None`` elsewhere. Keys are the transformers names (``model.layers.0...``); with
        LoRA, the adapters merged into the weights (``merged``, :mod:`shuffle_r1.lora`) or,
        ``merged=False``, peft's own names, adapters apart."""
        state = self.backend.full_state_dict()
        if self.rank != 0:
            return None
        state = {k: v.cpu() for k, v in state.items()}
        # Tied parameters (input/output embeddings) come back as separate copies; make them
        # one tensor again, so save_pretrained writes them once.
        first: dict[int, str] = {}
        for name, param in self.backend.module.named_parameters(remove_duplicate=False):
            if id(param) in first and name in state:
                state[name] = state[first[id(param)]]
            first.setdefault(id(param), name)
        if self.lora and merged:
            state = merge_lora_state(state, self.cfg.learner)
        return state

    def publish(self, dtype: str) -> tuple[list[ray.ObjectRef], dict[str, float]] | None:
        """Put the full model state, floating tensors cast to ``dtype``, into the object
        store once, from rank 0 (collective): one flat buffer per dtype
        (``Backend.flat_state``, :mod:`actors.rollout.transport`), which ``ray.get`` turns
        back into a state dict of views. Rank 0 returns ``([ref], parts)``: the seconds of
        each part (the backend's, then ``put``) and ``bytes`` published; the others
        ``None``."""
        times: dict[str, float] = {}
        flat: FlatWeights | None
        if self.lora:  # merged on rank 0 from the gathered state (shuffle_r1/lora.py)
            start = time.perf_counter()
            state = self.full_state_dict()
            times["gather"] = time.perf_counter() - start
            if state is None:
                return None
            start = time.perf_counter()
            tied = [
                (base_name(a), base_name(b))
                for a, b in tied_names(self.backend.module.state_dict(keep_vars=True))
            ]
            flat = pack(state, DTYPES[dtype], tied)
            times["pack"] = time.perf_counter() - start
        else:
            flat = self.backend.flat_state(DTYPES[dtype], times)
        if flat is None:
            return None
        start = time.perf_counter()
        ref = ray.put(flat)
        times["put"] = time.perf_counter() - start
        times["bytes"] = float(flat.nbytes)
        return [ref], times

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
                WRITE_ADVICE,
            ) from exc

    def _write_checkpoint(self, root: Path, version: int) -> None:
        state = self.full_state_dict(merged=False)
        if self.rank == 0:
            assert state is not None
            model_dir = root / "model"
            model_dir.mkdir(parents=True, exist_ok=True)
            module = self.backend.module
            if self.lora:  # model/ merged, loadable as a plain model; the adapters apart
                from safetensors.torch import save_file

                adapters = {k: v.contiguous() for k, v in state.items() if is_adapter(k)}
                save_file(adapters, str(root / ADAPTER_FILE))
                state = merge_lora_state(state, self.cfg.learner)
                module = module.get_base_model()
            module.save_pretrained(model_dir, state_dict=state)
            _copy_non_weight_files(Path(self.model_path), model_dir)
        del state
        self.backend.save_checkpoint(root)
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
        self.backend.load_checkpoint(root)
        return meta

    def ping(self) -> dict[str, Any]:
        """Liveness: rank, pid, device, torch's thread count, whether micro-batches run each
        distinct prompt once (not collective)."""
        return {
            "rank": self.rank,
            "pid": os.getpid(),
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "share_prompts": self.share_prompts,
        }

    def shutdown(self) -> None:
        """Leave the process group (collective when the group is healthy)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def _copy_non_weight_files(source: Path, target: Path) -> None:
    """Copy tokenizer, chat template and similar files from a model folder into a checkpoint."""
    if not source.is_dir():
        return
    for path in source.iterdir():
        keep = path.is_file() and not path.name.startswith(".") and path.name != "config.json"
        if keep and not path.name.endswith(_WEIGHT_SUFFIXES) and not (target / path.name).exists():
            shutil.copy2(path, target / path.name)
