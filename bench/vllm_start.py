"""vLLM engine start and generation speed, per dtype, cold and warm compile cache (#15).

Each measurement runs in a fresh process (as a rollout worker does): it builds
:class:`actors.rollout.VLLMEngine` — the product's engine, with its environment
(``VLLM_USE_AOT_COMPILE=0`` unless set, in-process engine, the rollout config's threads) —
for the benchmark recipe's model, times the start, then generates ``--prompts`` ×
``--n`` rollouts of ``--max-tokens`` tokens (a warm-up call first, vLLM's first
``generate`` is slower once) and reports tokens per second.

For every dtype asked: a ``cold`` start with empty caches (``VLLM_CACHE_ROOT`` and
``TORCHINDUCTOR_CACHE_DIR`` in a new folder: the model compiles), then ``--warm`` starts on
those caches (the restart a user sees). ``--aot 1`` sets ``VLLM_USE_AOT_COMPILE=1``
(vLLM's default, whose cache fails to load with torch 2.13) to show the difference. Prints
one JSON line per start: ``{"dtype", "cache", "start_s", "compiled", "tok_s", ...}``, and
a summary line with ``warm_start_s`` per dtype (target: <= 30 s) and the bf16/fp32 speed.

    python bench/vllm_start.py [--dtypes float32 bfloat16] [--warm 1] [--aot 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ROOT, bench_config, emit, train_prompts


def measure(dtype: str, prompts: int, n: int, max_tokens: int) -> dict[str, Any]:
    """One engine start and two timed generations in this process (the child's side)."""
    from actors.rollout import GenerationRequest, SamplingSpec, VLLMEngine, compile_cache_entries
    from shuffle_r1.models import resolve_model_path
    from shuffle_r1.precision import cpu_description

    cfg = bench_config([f"rollout.dtype={dtype}"])
    model = resolve_model_path(cfg.learner.model_path)
    requests = [
        GenerationRequest(f"b/{p.example.uid}", p.token_ids) for p in train_prompts(cfg, prompts)
    ]
    cached = compile_cache_entries()
    engine = VLLMEngine(model, cfg.rollout, seed=1)
    compiled = bool(compile_cache_entries() - cached)
    sampling = SamplingSpec(n=n, temperature=0.7, top_p=1.0, max_tokens=max_tokens, seed=1)
    engine.generate(requests, sampling)  # warm-up
    t = time.perf_counter()
    completions = engine.generate(requests, sampling)
    seconds = time.perf_counter() - t
    tokens = sum(len(c.token_ids) for c in completions)
    return {
        "dtype": engine.dtype,
        "start_s": round(engine.start_s, 2),
        "compiled": compiled,
        "tokens": tokens,
        "generate_s": round(seconds, 3),
        "tok_s": round(tokens / seconds, 1),
        "threads": cfg.rollout.threads_per_worker,
        "cpu": cpu_description(),
    }


def child(dtype: str, cache: Path, aot: int, args: argparse.Namespace) -> dict[str, Any]:
    env = {
        **os.environ,
        "VLLM_CACHE_ROOT": str(cache),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "torchinductor"),
        "VLLM_USE_AOT_COMPILE": str(aot),
    }
    cmd = [sys.executable, __file__, "--child", dtype, "--prompts", str(args.prompts)]
    cmd += ["--n", str(args.n), "--max-tokens", str(args.max_tokens)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    log = ROOT / "outputs" / "bench" / f"vllm_start-{dtype}-aot{aot}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as f:
        f.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{dtype}: the child failed (rc {proc.returncode}), log: {log}")
    line = next(x for x in proc.stdout.splitlines()[::-1] if x.startswith("{"))
    return {**json.loads(line), "process_s": round(time.perf_counter() - t, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--warm", type=int, default=1, help="starts on the warm cache per dtype")
    p.add_argument("--aot", type=int, default=0, choices=[0, 1], help="VLLM_USE_AOT_COMPILE")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.prompts, args.n, args.max_tokens)), flush=True)
        return
    summary: dict[str, Any] = {"summary": True, "aot": args.aot}
    for dtype in args.dtypes:
        with tempfile.TemporaryDirectory(prefix="vllm-cache-") as cache:
            runs = []
            for i in range(1 + args.warm):
                row = {"cache": "cold" if i == 0 else "warm", "aot": args.aot}
                row.update(child(dtype, Path(cache), args.aot, args))
                emit(row)
                runs.append(row)
        warm = [r["start_s"] for r in runs[1:]] or [runs[0]["start_s"]]
        summary[dtype] = {
            "cold_start_s": runs[0]["start_s"],
            "warm_start_s": min(warm),
            "tok_s": max(r["tok_s"] for r in runs),
            "cpu": runs[0]["cpu"],
        }
    if "float32" in summary and "bfloat16" in summary:
        summary["bf16_over_fp32_tok_s"] = round(
            summary["bfloat16"]["tok_s"] / summary["float32"]["tok_s"], 2
        )
    emit(summary)


if __name__ == "__main__":
    main()
