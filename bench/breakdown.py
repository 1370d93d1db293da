"""Cost breakdown: per-phase step time and how it grows with group size n and prompt batch (#7).

One shuffle-r1 trainer (the benchmark recipe, Shuffle-R1 with alpha = 0.5, S = 8) runs
``--steps`` training steps at each setting (group size n, prompts per step), the first step
of each setting discarded (vLLM's first batch of a new shape is slower), and steps that
skipped their update (no group with reward contrast) not counted. The settings are
n = 4, 8, 16 at ``--prompts`` prompts, then ``--prompts`` / 2 and x 2 at n = 8. Between
settings only n and the prompt batch change (and ``learner.global_batch_size`` = prompts: one
optimizer step per training step); the trainer, its workers and the model carry on.

Phases (``Trainer.step``'s ``time/*`` metrics, seconds): ``generate`` (rollout phase),
``reward`` (scoring over Serve), ``buffer`` (protobuf building + PutGroups: GRPO advantages
and PTS + Sample: ABS, over gRPC and Redis), ``old_logprobs`` (the learner's forward pass),
``update`` (forward + backward + optimizer step), ``weight_sync`` (publishing the weights
into the object store + the rollout worker loading them). Prints one JSON line per setting
with the median of each phase, its share of the step, and ``buffer_share`` (target: < 1%).

    python bench/breakdown.py [--prompts 8] [--steps 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics

from common import bench_config, emit

PHASES = ("generate", "reward", "buffer", "old_logprobs", "update", "weight_sync")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args()

    from services.trainer.loop import Trainer
    from shuffle_r1.data import PromptSampler

    big = args.prompts * 2
    settings = [(4, args.prompts), (8, args.prompts), (16, args.prompts)]
    settings += [(8, max(args.prompts // 2, 1)), (8, big)]
    cfg = bench_config(
        [
            "algorithm.name=shuffle_r1",
            f"rollout.max_response_length={args.max_tokens}",
            f"trainer.rollout_batch_size={big}",
            f"learner.global_batch_size={big}",
            "trainer.run_name=bench-breakdown",
            "trainer.output_dir=outputs/bench/breakdown",
            "trainer.eval_every=0",
        ]
    )
    step = 0
    with Trainer(cfg) as trainer:
        for n, prompts in settings:
            # The next steps' shape: n rollouts per prompt, `prompts` prompts, one optimizer
            # step each (the learner group sizes its mini-batch from this same config).
            trainer.cfg.rollout.n = n
            trainer.cfg.learner.global_batch_size = prompts
            trainer.sampler = PromptSampler(
                len(trainer.train_prompts), prompts, seed=cfg.data.seed + step
            )
            # Only steps that updated count: a step whose groups all lack reward contrast
            # skips the update (docs/algorithm.md §3) and would hide the learner's cost.
            rows, skipped, tried = [], 0, 0
            while len(rows) < args.steps - 1 and tried < 3 * args.steps:
                m = trainer.step(step)
                step, tried = step + 1, tried + 1
                if tried == 1:
                    continue  # warm-up: the first step of a new shape
                if m["learner/skipped_update"]:
                    skipped += 1
                else:
                    rows.append(m)
            if not rows:
                emit(
                    {
                        "bench": "breakdown",
                        "n": n,
                        "prompts": prompts,
                        "error": f"every step skipped its update ({tried} tried)",
                    }
                )
                continue
            med = {
                phase: statistics.median(r.get(f"time/{phase}_s", 0.0) for r in rows)
                for phase in PHASES
            }
            step_s = statistics.median(r["time/step_s"] for r in rows)
            emit(
                {
                    "bench": "breakdown",
                    "n": n,
                    "prompts": prompts,
                    "rollouts_per_step": n * prompts,
                    "trained_rollouts": statistics.median(r["buffer/batch_rollouts"] for r in rows),
                    "tokens_per_step": statistics.median(r["rollout/tokens"] for r in rows),
                    "step_s": step_s,
                    "phases_s": med,
                    "shares": {k: v / step_s for k, v in med.items()},
                    "other_s": step_s - sum(med.values()),
                    "buffer_share": med["buffer"] / step_s,
                    "target_buffer_share": 0.01,
                    "optimizer_steps": statistics.median(
                        r.get("learner/num_optimizer_steps", 0.0) for r in rows
                    ),
                    "steps_measured": len(rows),
                    "steps_skipped_update": skipped,
                }
            )


if __name__ == "__main__":
    main()
