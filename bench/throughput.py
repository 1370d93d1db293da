"""System throughput against a peer: TRL's GRPOTrainer vs shuffle-r1 on this machine (#7).

Same model (SmolLM2-135M-Instruct, the embedded default's), task (two-digit addition,
``data/add2``), prompt (docs/algorithm.md §6's instruction + problem, the model's chat
template), reward (``math_reward_last_number_fallback``), group size ``--n``, prompts per step
``--prompts``, completion limit ``--max-tokens``, sampling (T = 1.0, top-p 1.0), loss (GRPO
advantages, PPO clip 0.2, no KL, token-mean), learning rate, fp32 training, and one
optimizer step per training step. shuffle-r1 runs plain GRPO here (``algorithm.name=grpo``:
it trains on every rollout, as TRL does) with its embedded layout: one vLLM rollout worker
(2 threads), 2 learner ranks (FSDP2, or DeepSpeed ZeRO-2 with ``--backend deepspeed``), the
Redis-backed buffer. TRL 1.16 runs as its docs give
for one CPU process: ``GRPOConfig(use_cpu=True, bf16=False)``, transformers ``generate`` (TRL's
vLLM mode needs CUDA), gradient checkpointing off.

One run, alternating: ``--rounds`` times, ``--steps`` shuffle-r1 steps (in this process, its
trainer kept between rounds) then ``--steps`` TRL steps (a child process, ``trl-steps``, one
extra first step discarded as warm-up). shuffle-r1's first step is discarded too. Prints one
JSON line per round and side, then a summary: median steps/s and generated tokens/s of each
and ``ratio = shuffle_r1 / trl`` (target: steps/s ratio >= 2). Each side's ``mfu`` is its
step's model FLOPs (``roofline.model_flops``: the training pass over every rollout, at the
mean prompt length of the prompts both sides draw and the side's mean response length,
plus generating those rollouts) per second of step, over the float32 matmul peak on 2
threads that ``bench/roofline.py`` measured (``bench/results/roofline.json``; null without
it): both sides train in float32 on the 2 cores.

    python bench/throughput.py [--prompts 4] [--n 4] [--max-tokens 32] [--steps 3] [--rounds 2]
        [--backend fsdp2|deepspeed]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, bench_config, emit, stats, train_prompts
from roofline import load_model_config, load_roofline, model_flops, peak_flops, roofline_source

LR = 1.0e-6


def trl_steps(args: argparse.Namespace) -> None:
    """``--steps`` + 1 TRL GRPO steps; prints one JSON object with each step's wall seconds
    and generated tokens (the first step is the warm-up)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from shuffle_r1.data import load_examples
    from shuffle_r1.data.prompt import build_messages
    from shuffle_r1.models import resolve_model_path
    from shuffle_r1.rewards import math_reward_last_number_fallback

    cfg = bench_config()
    model_path = str(resolve_model_path(cfg.learner.model_path))
    examples = load_examples(
        cfg.data.train_path, problem_key="question", answer_key="answer", id_key="id"
    ).examples
    start = args.offset % len(examples)
    chosen = (examples * 2)[start : start + args.prompts * (args.steps + 1)]
    data = Dataset.from_list([{"prompt": build_messages(ex), "answer": ex.answer} for ex in chosen])

    def reward(completions: list[Any], answer: list[str], **_: Any) -> list[float]:
        return [
            math_reward_last_number_fallback(c[0]["content"], a).reward
            for c, a in zip(completions, answer, strict=True)
        ]

    times: list[float] = []
    tokens: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            times.append(time.perf_counter() - self.t)

        def on_log(self, _args: Any, _state: Any, _control: Any, logs: Any = None, **__: Any):
            if logs and "completions/mean_length" in logs:
                tokens.append(logs["completions/mean_length"] * args.prompts * args.n)

    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    config = GRPOConfig(
        output_dir=str(ROOT / "outputs" / "bench" / "trl"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=args.prompts * args.n,
        num_generations=args.n,
        max_completion_length=args.max_tokens,
        temperature=1.0,
        top_p=1.0,
        beta=0.0,
        epsilon=0.2,
        learning_rate=LR,
        gradient_checkpointing=False,
        max_steps=args.steps + 1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        shuffle_dataset=False,
        seed=args.seed,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=data,
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    print("TRL_RESULT " + json.dumps({"step_s": times, "tokens": tokens}), flush=True)


def run_trl(args: argparse.Namespace, round_: int) -> dict[str, list[float]]:
    cmd = [
        sys.executable,
        __file__,
        "trl-steps",
        f"--prompts={args.prompts}",
        f"--n={args.n}",
        f"--max-tokens={args.max_tokens}",
        f"--steps={args.steps}",
        f"--offset={round_ * args.prompts * (args.steps + 1)}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=3600)
    for line in out.stdout.splitlines():
        if line.startswith("TRL_RESULT "):
            result = json.loads(line[len("TRL_RESULT ") :])
            return {"step_s": result["step_s"][1:], "tokens": result["tokens"][1:]}
    raise RuntimeError(f"TRL run failed (rc={out.returncode}):\n{out.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", nargs="?", default="compare", choices=["compare", "trl-steps"])
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--backend", choices=["fsdp2", "deepspeed"], default="fsdp2")
    args = p.parse_args()
    if args.command == "trl-steps":
        trl_steps(args)
        return

    from services.trainer.loop import Trainer

    cfg = bench_config(
        [
            "algorithm.name=grpo",
            f"rollout.n={args.n}",
            f"rollout.max_response_length={args.max_tokens}",
            f"trainer.rollout_batch_size={args.prompts}",
            f"learner.global_batch_size={args.prompts}",
            f"learner.micro_batch_size={args.prompts * args.n}",
            "learner.dtype=float32",
            f"learner.backend={args.backend}",
            f"learner.lr={LR}",
            "data.shuffle=false",
            "trainer.run_name=bench-throughput",
            "trainer.output_dir=outputs/bench/throughput",
            "trainer.eval_every=0",
        ]
    )
    sides: dict[str, dict[str, list[float]]] = {
        "shuffle_r1": {"step_s": [], "tokens": []},
        "trl": {"step_s": [], "tokens": []},
    }
    step = 0
    with Trainer(cfg) as trainer:
        for round_ in range(args.rounds):
            rows = []
            for _ in range(args.steps + (round_ == 0)):
                rows.append(trainer.step(step))
                step += 1
            rows = rows[1:] if round_ == 0 else rows
            ours = {
                "step_s": [r["time/step_s"] for r in rows],
                "tokens": [r["rollout/tokens"] for r in rows],
            }
            theirs = run_trl(args, round_)
            for side, got in (("shuffle_r1", ours), ("trl", theirs)):
                emit({"bench": "throughput", "round": round_, "side": side, **got})
                for k in got:
                    sides[side][k] += got[k]
    summary: dict[str, Any] = {"bench": "throughput_summary", "prompts": args.prompts}
    summary["backend"] = args.backend
    summary.update({"n": args.n, "max_tokens": args.max_tokens})
    config = load_model_config(cfg.learner.model_path)
    drawn = train_prompts(cfg, args.rounds * args.prompts * (args.steps + 1))
    prompt_mean = statistics.fmean(len(q.token_ids) for q in drawn)
    roof = load_roofline()
    peak = peak_flops(roof, "float32", 2) if roof else None
    rollouts = args.prompts * args.n
    for side, got in sides.items():
        tokens_per_step = statistics.median(got["tokens"])
        per_seq = model_flops(config, prompt_mean, tokens_per_step / rollouts, 4)
        flops = rollouts * (per_seq["train_step"] + per_seq["decode"])
        flops += args.prompts * per_seq["prefill"]
        flops_per_s = flops / statistics.median(got["step_s"])
        summary[side] = {
            "step_s": stats(got["step_s"]),
            "steps_per_s": 1 / statistics.median(got["step_s"]),
            "tokens_per_step": tokens_per_step,
            "tokens_per_s": sum(got["tokens"]) / sum(got["step_s"]),
            "model_flops_per_step": flops,
            "model_flops_per_s": flops_per_s,
            "mfu": flops_per_s / peak if peak else None,
        }
    summary["prompt_tokens_mean"] = prompt_mean
    summary["roofline"] = roofline_source(roof)
    summary["steps_per_s_ratio"] = (
        summary["shuffle_r1"]["steps_per_s"] / summary["trl"]["steps_per_s"]
    )
    summary["tokens_per_s_ratio"] = (
        summary["shuffle_r1"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
    )
    summary["target_steps_per_s_ratio"] = 2.0
    emit(summary)


if __name__ == "__main__":
    Path(ROOT / "outputs" / "bench").mkdir(parents=True, exist_ok=True)
    main()
