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

Utilisation, against the peaks ``bench/roofline.py`` measured (``bench/results/roofline.json``;
without it the line says so and the figures are null), from each measured step's own token
counts (the trained batch's prompt and response lengths, the step's prompts and mean
response length) and the model's shapes (``roofline.model_flops``), medians over the steps:
``update_mfu`` and ``old_logprobs_mfu`` (the learner's FLOPs per second over the peak in its
dtype of one thread per rank, times the ranks; null where the update's own pass gave the old
log-probs), ``generate_roofline_share`` (the least time the rollout phase could take at the
engine's FLOP peak and the memory bandwidth, ``roofline.generation_bound``, over the time it
took) and ``weight_sync_memcpy_share`` (the weights' bytes in the engine's dtype per second
of weight sync over a memcpy's rate on 2 threads).

    python bench/breakdown.py [--prompts 8] [--steps 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

from common import bench_config, emit
from roofline import (
    DTYPE_BYTES,
    ModelShape,
    generation_bound,
    learner_peak,
    load_model_config,
    load_roofline,
    memory_rate,
    model_flops,
    peak_flops,
    roofline_source,
)

PHASES = ("generate", "reward", "buffer", "old_logprobs", "update", "weight_sync")


def step_utilisation(
    m: dict[str, float],
    trained: list[tuple[int, int]],
    prompt_lens: list[int],
    cfg: Any,
    config: dict[str, Any],
    roof: dict[str, Any] | None,
) -> dict[str, Any]:
    """One step's FLOPs and utilisation (see the module's docstring) from its metrics ``m``,
    the (prompt, response) lengths of the rollouts it trained on and its prompts' lengths."""
    from shuffle_r1.precision import resolve_dtype

    learner_dtype = resolve_dtype(cfg.learner.dtype, cuda=False).dtype
    engine_dtype = resolve_dtype(cfg.rollout.dtype, cuda=False).dtype
    forward = sum(model_flops(config, p, r)["forward"] for p, r in trained)
    reused = bool(m.get("learner/old_logprobs_reused"))
    out: dict[str, Any] = {
        "tokens_trained": float(sum(p + r for p, r in trained)),
        "update_flops": 3 * forward * cfg.learner.ppo_epochs,
        "old_logprobs_flops": 0.0 if reused else forward,
        "update_mfu": None,
        "old_logprobs_mfu": None,
        "generate_roofline_share": None,
        "generate_bound": None,
        "weight_sync_bytes_per_s": None,
        "weight_sync_memcpy_share": None,
    }
    weight_bytes = ModelShape.from_config(config).params * DTYPE_BYTES[engine_dtype]
    if m.get("time/weight_sync_s"):
        out["weight_sync_bytes_per_s"] = weight_bytes / m["time/weight_sync_s"]
    if roof is None:
        return out
    learner = learner_peak(roof, learner_dtype, cfg.learner.num_ranks)
    if learner:
        out["update_mfu"] = out["update_flops"] / m["time/update_s"] / learner
        if not reused:
            out["old_logprobs_mfu"] = forward / m["time/old_logprobs_s"] / learner
    threads = cfg.rollout.threads_per_worker
    engine_peak, bandwidth = peak_flops(roof, engine_dtype, threads), memory_rate(roof, threads)
    if engine_peak and bandwidth:
        bound = generation_bound(
            config,
            prompt_lens,
            cfg.rollout.n,
            m["rollout/response_len_mean"],
            engine_peak,
            bandwidth,
            DTYPE_BYTES[engine_dtype],
        )
        out["generate_roofline_share"] = bound["bound_s"] / m["time/generate_s"]
        out["generate_bound"] = bound["bound"]
    memcpy = memory_rate(roof, 2, "copy_bytes_per_s")
    if memcpy and out["weight_sync_bytes_per_s"]:
        out["weight_sync_memcpy_share"] = out["weight_sync_bytes_per_s"] / memcpy
    return out


def median_of(rows: list[dict[str, Any]], key: str) -> Any:
    """The median of ``key`` over ``rows`` where it is a number; else the first value (a
    label such as ``generate_bound``, or None)."""
    values = [r[key] for r in rows if isinstance(r[key], int | float)]
    return statistics.median(values) if values else rows[0][key]


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
    config = load_model_config(cfg.learner.model_path)
    roof = load_roofline()
    step = 0
    with Trainer(cfg) as trainer:
        prompt_len = {q.example.uid: len(q.token_ids) for q in trainer.train_prompts}
        # The rollouts each step trains on, (prompt, response) lengths: recorded on their
        # way into the learner group (the step's metrics carry only their count).
        trained: list[tuple[int, int]] = []
        update = trainer.learner.update

        def recording_update(batch: Any, *rest: Any, **kw: Any) -> dict[str, float]:
            lens = zip(batch.prompt_token_ids, batch.response_token_ids, strict=True)
            trained.extend((len(p), len(r)) for p, r in lens)
            return update(batch, *rest, **kw)

        trainer.learner.update = recording_update  # type: ignore[method-assign]
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
            rows: list[dict[str, float]] = []
            used: list[dict[str, Any]] = []
            skipped, tried = 0, 0
            while len(rows) < args.steps - 1 and tried < 3 * args.steps:
                trained.clear()
                m = trainer.step(step)
                step, tried = step + 1, tried + 1
                if tried == 1:
                    continue  # warm-up: the first step of a new shape
                if m["learner/skipped_update"]:
                    skipped += 1
                else:
                    rows.append(m)
                    lens = [prompt_len[uid] for uid in trainer.last_prompt_ids]
                    used.append(step_utilisation(m, trained, lens, trainer.cfg, config, roof))
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
                    "utilisation": {k: median_of(used, k) for k in used[0]},
                    "roofline": roofline_source(roof),
                }
            )


if __name__ == "__main__":
    main()
