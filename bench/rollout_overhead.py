"""Rollout overhead: shuffle-r1's rollout phase against plain vLLM on the same prompts (#7).

Both sides generate the same requests with the same sampling (the benchmark recipe's
``rollout.n``, temperature, top-p, ``max_response_length``; per-request seeds from
:func:`actors.rollout.request_seed`, so both produce the same tokens, which is checked):

- ``raw``: one ``vllm.LLM`` in this process, built with the engine arguments
  :class:`actors.rollout.VLLMEngine` uses (in-process engine, no chunked prefill on CPU,
  processed log-probs, the same threads and KV cache), one ``LLM.generate`` call;
- ``shuffle_r1``: :meth:`actors.rollout.RolloutPool.generate`, the trainer's rollout phase —
  a Ray Serve deployment of one rollout worker, its weight-version check, the engine wrapper
  turning vLLM's outputs into completions, and the reply through Ray.

The two alternate, ``--rounds`` times each after one warm-up round each (vLLM's first
``generate`` is slower once), so both see the same machine. Prints one JSON line: wall
seconds per round (median) for each side, generated tokens per second, and
``overhead = shuffle_r1 / raw - 1`` (target: <= 0.10).

    python bench/rollout_overhead.py [--prompts 8] [--n 8] [--max-tokens 64] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from common import bench_config, emit, stats, train_prompts


def raw_engine(model_path: str, cfg: Any, seed: int) -> Any:
    """A plain ``vllm.LLM`` with VLLMEngine's CPU arguments."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gb)
    os.environ["OMP_NUM_THREADS"] = str(cfg.threads_per_worker)
    import torch

    torch.set_num_threads(cfg.threads_per_worker)
    from vllm import LLM

    kwargs: dict[str, Any] = {}
    if not torch.cuda.is_available():
        kwargs["enable_chunked_prefill"] = False
    return LLM(
        model=model_path, seed=seed, dtype="auto", logprobs_mode="processed_logprobs", **kwargs
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()

    import ray
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from actors.rollout import GenerationRequest, RolloutPool, SamplingSpec, request_seed
    from actors.serving import ensure_serve
    from services.trainer.loop import init_ray
    from shuffle_r1.models import resolve_model_path

    cfg = bench_config([f"rollout.n={args.n}", f"rollout.max_response_length={args.max_tokens}"])
    model_path = str(resolve_model_path(cfg.learner.model_path))
    prompts = train_prompts(cfg, args.prompts)
    r = cfg.rollout

    init_ray(cfg)
    ensure_serve(http_port=0)
    pool = RolloutPool(r, model_path, "bench-overhead", cfg.cluster.namespace, seed=1)
    llm = raw_engine(model_path, r, seed=1)

    def spec(round_: int) -> SamplingSpec:
        return SamplingSpec(
            n=r.n,
            temperature=r.temperature,
            top_p=r.top_p,
            max_tokens=r.max_response_length,
            seed=1000 + round_,
        )

    def run_raw(round_: int) -> tuple[float, list[list[int]]]:
        s = spec(round_)
        params = [
            SamplingParams(
                n=s.n,
                temperature=s.temperature,
                top_p=s.top_p,
                top_k=0,
                max_tokens=s.max_tokens,
                logprobs=0,
                detokenize=False,
                seed=request_seed(s.seed, f"r/{q.example.uid}"),
            )
            for q in prompts
        ]
        t = time.perf_counter()
        outs = llm.generate(
            [TokensPrompt(prompt_token_ids=q.token_ids) for q in prompts], params, use_tqdm=False
        )
        wall = time.perf_counter() - t
        return wall, [
            list(c.token_ids) for o in outs for c in sorted(o.outputs, key=lambda c: c.index)
        ]

    def run_pool(round_: int) -> tuple[float, list[list[int]]]:
        requests = [GenerationRequest(f"r/{q.example.uid}", q.token_ids) for q in prompts]
        t = time.perf_counter()
        result = pool.generate(requests, spec(round_))
        wall = time.perf_counter() - t
        return wall, [list(c.token_ids) for c in result.completions]

    walls: dict[str, list[float]] = {"raw": [], "shuffle_r1": []}
    tokens: dict[str, list[int]] = {"raw": [], "shuffle_r1": []}
    same = 0
    for round_ in range(args.rounds + 1):
        raw_wall, raw_ids = run_raw(round_)
        pool_wall, pool_ids = run_pool(round_)
        same += raw_ids == pool_ids
        if round_ == 0:
            continue  # warm-up
        walls["raw"].append(raw_wall)
        walls["shuffle_r1"].append(pool_wall)
        tokens["raw"].append(sum(map(len, raw_ids)))
        tokens["shuffle_r1"].append(sum(map(len, pool_ids)))
    pool.shutdown()
    ray.shutdown()
    raw_med, pool_med = stats(walls["raw"])["median"], stats(walls["shuffle_r1"])["median"]
    emit(
        {
            "bench": "rollout_overhead",
            "prompts": args.prompts,
            "n": args.n,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "raw_s": stats(walls["raw"]),
            "shuffle_r1_s": stats(walls["shuffle_r1"]),
            "raw_tokens_per_s": sum(tokens["raw"]) / sum(walls["raw"]),
            "shuffle_r1_tokens_per_s": sum(tokens["shuffle_r1"]) / sum(walls["shuffle_r1"]),
            "identical_tokens_rounds": f"{same}/{args.rounds + 1}",
            "overhead": pool_med / raw_med - 1,
            "target_overhead": 0.10,
        }
    )


if __name__ == "__main__":
    main()
