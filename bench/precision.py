"""float32 against bfloat16 on this processor: generation tok/s and learner seconds per
update (#15, README "Precision").

For each dtype, in a fresh process (as the roles run):

- **generation**: :class:`actors.rollout.VLLMEngine` (the product's engine, the benchmark
  recipe's threads) on the recipe's model, ``--prompts`` × ``--n`` rollouts of up to
  ``--max-tokens`` tokens at T = 0.7, seeded; one warm-up call, then ``--rounds`` timed
  calls: tokens per second (median);
- **learner**: :class:`actors.learner.LearnerGroup` (the recipe's FSDP2 ranks and micro-batch)
  updating on one fixed batch of ``--prompts`` × ``--n`` / 2 rollouts (the main job's
  trained rollouts per step: PTS keeps half) of the recipe's prompts with ``--response``
  -token responses; one warm-up update, then ``--rounds`` timed ones: seconds per update
  (median), as a training step spends them.

``--emulate-avx2`` runs every measurement again with oneDNN and ATen held to AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2``): on an AVX-512 BF16 machine this
approximates a processor without native bf16 (the kind where bf16 falls back to slow paths).
It is an emulation, labelled as such; the real AVX2 figures in the README come from such a
machine.

Prints one JSON line per (isa, dtype) and a summary line with the float32/bfloat16 ratios; a
measurement that runs past ``--child-timeout`` seconds is reported as such (emulated bf16
updates took minutes each here).
vLLM's compile cache is the user's (``~/.cache/vllm``): a first start per dtype compiles
(~100 s), later ones take ~25 s.

    python bench/precision.py [--dtypes float32 bfloat16] [--emulate-avx2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

from common import ROOT, bench_config, emit, train_prompts

AVX2_ENV = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def generation(dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    from actors.rollout import GenerationRequest, SamplingSpec, VLLMEngine
    from shuffle_r1.models import resolve_model_path

    cfg = bench_config([f"rollout.dtype={dtype}"])
    prompts = train_prompts(cfg, args.prompts)
    requests = [GenerationRequest(f"b/{p.example.uid}", p.token_ids) for p in prompts]
    engine = VLLMEngine(resolve_model_path(cfg.learner.model_path), cfg.rollout, seed=1)
    spec = SamplingSpec(n=args.n, temperature=0.7, top_p=1.0, max_tokens=args.max_tokens, seed=1)
    engine.generate(requests, spec)  # vLLM's first generate is slower once
    rates = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        tokens = sum(len(c.token_ids) for c in engine.generate(requests, spec))
        rates.append(tokens / (time.perf_counter() - t))
    return {"engine_start_s": round(engine.start_s, 1), "tok_s": round(statistics.median(rates), 1)}


def learner(dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch

    from actors.learner import LearnerGroup
    from shuffle_r1.models import resolve_model_path
    from shuffle_r1.training import TrainBatch

    cfg = bench_config([f"learner.dtype={dtype}"])
    rollouts = args.prompts * args.n // 2
    prompts = train_prompts(cfg, args.prompts)
    gen = torch.Generator().manual_seed(0)
    batch = TrainBatch(
        prompt_token_ids=[prompts[i // (args.n // 2)].token_ids for i in range(rollouts)],
        response_token_ids=torch.randint(
            100, 40000, (rollouts, args.response), generator=gen
        ).tolist(),
        advantages=torch.tensor([1.0, -1.0] * (rollouts // 2)),
    )
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}
    )
    try:
        group = LearnerGroup(cfg, resolve_model_path(cfg.learner.model_path))
        old = None if group.single_step(rollouts) else group.compute_logprobs(batch)
        group.update(batch, old)  # warm-up
        seconds = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            old = None if group.single_step(rollouts) else group.compute_logprobs(batch)
            group.update(batch, old)
            seconds.append(time.perf_counter() - t)
        group.shutdown()
    finally:
        ray.shutdown()
    tokens = rollouts * args.response
    update_s = statistics.median(seconds)
    return {
        "rollouts": rollouts,
        "update_s": round(update_s, 2),
        "train_tok_s": round(tokens / update_s, 1),
        "ranks": cfg.learner.num_ranks,
    }


def child(dtype: str, isa: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, **(AVX2_ENV if isa == "avx2-emulated" else {})}
    cmd = [sys.executable, __file__, "--child", dtype, "--rounds", str(args.rounds)]
    cmd += ["--prompts", str(args.prompts), "--n", str(args.n)]
    cmd += ["--max-tokens", str(args.max_tokens), "--response", str(args.response)]
    log = ROOT / "outputs" / "bench" / f"precision-{isa}-{dtype}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # its own session: on a timeout the child and the Ray it started go together
    proc = subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=args.child_timeout)
    except subprocess.TimeoutExpired:  # emulated bf16 took minutes per update here
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"isa": isa, "dtype": dtype, "timed_out_after_s": args.child_timeout}
    log.write_text(stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{isa} {dtype}: the child failed (rc {proc.returncode}), log: {log}")
    line = next(x for x in stdout.splitlines()[::-1] if x.startswith("{"))
    return {"isa": isa, "dtype": dtype, **json.loads(line)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--emulate-avx2", action="store_true", help="also with oneDNN/ATen at AVX2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--response", type=int, default=32, help="response tokens per rollout")
    p.add_argument("--child-timeout", type=float, default=900.0, help="seconds per dtype")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        from shuffle_r1.precision import cpu_description

        row = {
            "cpu": cpu_description(),
            **generation(args.child, args),
            **learner(args.child, args),
        }
        print(json.dumps(row), flush=True)
        return
    rows = []
    for isa in ("native", "avx2-emulated") if args.emulate_avx2 else ("native",):
        for dtype in args.dtypes:
            rows.append(child(dtype, isa, args))
            emit(rows[-1])
    summary: dict[str, Any] = {"summary": True}
    for isa in {r["isa"] for r in rows}:
        by = {r["dtype"]: r for r in rows if r["isa"] == isa}
        if {"float32", "bfloat16"} <= set(by) and all("tok_s" in r for r in by.values()):
            summary[isa] = {
                "tok_s_fp32_over_bf16": round(by["float32"]["tok_s"] / by["bfloat16"]["tok_s"], 2),
                "update_s_bf16_over_fp32": round(
                    by["bfloat16"]["update_s"] / by["float32"]["update_s"], 2
                ),
            }
    emit(summary)


if __name__ == "__main__":
    main()
