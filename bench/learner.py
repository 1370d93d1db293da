"""The learner alone: seconds per update and MFU by layout (ranks x threads) and micro-batch
(#17 item 2, README "Learner: ranks, threads and micro-batches").

For each ``--layouts`` entry ``RxT`` (R FSDP2 ranks of T threads each, ``learner.num_ranks``
and ``learner.threads_per_rank``), each ``--micro`` setting and each ``--share-prompts``
(``learner.share_prompts``: each distinct prompt of a micro-batch runs once), in a fresh
process (as the roles run), :class:`actors.learner.LearnerGroup` updates on one fixed batch
shaped like the main job's (``configs/arith_smollm2_cpu.yaml``): ``--prompts`` prompts of
the recipe x ``--n`` / 2 rollouts each (PTS keeps half), response lengths drawn uniformly
from ``[--min-response, --max-response]`` (seeded; the main job's responses are 20-64
tokens), advantages +-1 in pairs, the pairs in a shuffled order (as ABS serves them); one
optimizer step per update, old log-probs from the update's own pass (as the main job). One
warm-up update, then ``--rounds`` timed ones.

A ``--micro`` setting is ``rows:N`` (``learner.micro_batch_size=N``) or ``tokens:N``
(``learner.micro_batch_tokens=N``: length-sorted micro-batches of at most N token positions).

Each line reports the median seconds per update, the real tokens (prompt + response) and
the token positions the micro-batches ran (``positions``: padding included, a shared prompt
once; the learner's own count, ``LearnerGroup.update``), the peak resident memory of a rank,
and the MFU: the training FLOPs of the real tokens as full rows (``roofline.model_flops``)
over the seconds, against the layout's matmul peak in its dtype
(``bench/results/roofline.json``, or ``--roofline``: ranks x the T-thread peak). With shared
prompts the model computes fewer positions than the full rows hold, so that MFU is the
effective rate of useful work, not what the hardware did.

    python bench/learner.py [--layouts 2x1 1x2] [--micro rows:8 rows:16 tokens:1280]
        [--share-prompts on off] [--rounds 3] [--out bench/results/learner.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import ROOT, bench_config, emit, train_prompts
from roofline import RESULT as ROOFLINE
from roofline import load_model_config, load_roofline, model_flops, peak_flops, roofline_source


def overrides(layout: str, micro: str) -> list[str]:
    """Config overrides of a ``RxT`` layout and a ``rows:N`` / ``tokens:N`` micro-batch."""
    ranks, threads = (int(x) for x in layout.split("x"))
    kind, _, value = micro.partition(":")
    if kind not in ("rows", "tokens") or not value.isdigit():
        raise SystemExit(f"--micro {micro!r}: expected rows:N or tokens:N")
    out = [f"learner.num_ranks={ranks}", f"learner.threads_per_rank={threads}"]
    if kind == "rows":
        return [*out, f"learner.micro_batch_size={value}", "learner.micro_batch_tokens=0"]
    return [*out, f"learner.micro_batch_tokens={value}"]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch

    from actors.learner import LearnerGroup
    from shuffle_r1.models import resolve_model_path
    from shuffle_r1.precision import resolve_dtype
    from shuffle_r1.training import TrainBatch

    share = f"learner.share_prompts={args.share_one == 'on'}"
    cfg = bench_config([*overrides(args.layout, args.micro_one), share])
    per_prompt = args.n // 2
    rollouts = args.prompts * per_prompt
    prompts = train_prompts(cfg, args.prompts)
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_response, args.max_response) for _ in range(rollouts)]
    # pairs in a shuffled order, as ABS serves them: a prompt's pairs are not adjacent
    owner = [pair // (per_prompt // 2) for pair in range(rollouts // 2)]
    rng.shuffle(owner)
    gen = torch.Generator().manual_seed(args.seed)
    batch = TrainBatch(
        prompt_token_ids=[prompts[owner[i // 2]].token_ids for i in range(rollouts)],
        response_token_ids=[
            torch.randint(100, 40000, (length,), generator=gen).tolist() for length in lengths
        ],
        advantages=torch.tensor([1.0, -1.0] * (rollouts // 2)),
    )
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}
    )
    try:
        group = LearnerGroup(cfg, resolve_model_path(cfg.learner.model_path))
        if not group.single_step(rollouts):
            raise SystemExit(f"{rollouts} rollouts are more than one optimizer step here")
        group.update(batch, None)  # warm-up
        seconds, metrics = [], {}
        for _ in range(args.rounds):
            t = time.perf_counter()
            metrics = group.update(batch, None)
            seconds.append(time.perf_counter() - t)
        group.shutdown()
    finally:
        ray.shutdown()
    prompt_tokens = sum(len(p) for p in batch.prompt_token_ids)
    response_tokens = sum(lengths)
    dtype = resolve_dtype(cfg.learner.dtype, cuda=False).dtype
    config = load_model_config(resolve_model_path(cfg.learner.model_path))
    flops = model_flops(config, prompt_tokens / rollouts, response_tokens / rollouts)
    train_flops = flops["train_step"] * rollouts
    update_s = statistics.median(seconds)
    row: dict[str, Any] = {
        "layout": args.layout,
        "micro": args.micro_one,
        "share_prompts": args.share_one == "on",
        "pairs": "shuffled",
        "dtype": dtype,
        "rollouts": rollouts,
        "prompt_tokens": prompt_tokens,
        "response_tokens": response_tokens,
        "positions": metrics.get("positions"),
        "microbatches_per_rank": metrics.get("microbatches_per_rank"),
        "peak_memory_mb": metrics.get("peak_memory_mb"),
        "update_s": round(update_s, 2),
        "update_s_all": [round(s, 2) for s in seconds],
        "train_tflop": round(train_flops / 1e12, 3),
    }
    roofline = load_roofline(args.roofline)
    ranks, threads = (int(x) for x in args.layout.split("x"))
    peak = None if roofline is None else peak_flops(roofline, dtype, threads)
    if peak is not None:
        row["peak_gflop_s"] = round(peak * ranks / 1e9, 1)
        row["mfu"] = round(train_flops / update_s / (peak * ranks), 3)
    row["roofline"] = roofline_source(roofline, args.roofline)
    return row


def child(layout: str, micro: str, share: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", layout, "--micro-one", micro, "--share-one", share]
    for name in ("rounds", "prompts", "n", "min_response", "max_response", "seed", "roofline"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    log = ROOT / "outputs" / "bench" / f"learner-{layout}-{micro.replace(':', '')}-{share}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # on a timeout the child and the Ray it started go together
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"layout": layout, "micro": micro, "share_prompts": share == "on",
                "timed_out_after_s": args.child_timeout}  # fmt: skip
    log.write_text(stderr)
    if proc.returncode != 0:
        raise SystemExit(
            f"{layout} {micro} {share}: the child failed (rc {proc.returncode}): {log}"
        )
    line = next(x for x in stdout.splitlines()[::-1] if x.startswith("{"))
    return dict(json.loads(line))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layouts", nargs="+", default=["2x1", "1x2"])
    p.add_argument("--micro", nargs="+", default=["rows:8", "rows:16", "tokens:1280"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--min-response", type=int, default=20)
    p.add_argument("--max-response", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child-timeout", type=float, default=900.0)
    p.add_argument(
        "--roofline", type=lambda p: Path(p).resolve(), default=ROOFLINE,
        help="bench/roofline.py's --out",
    )  # fmt: skip
    p.add_argument("--out", type=Path, help="append each line to this JSONL file")
    p.add_argument(
        "--share-prompts", nargs="+", choices=["on", "off"], default=["on", "off"],
        help="learner.share_prompts: each distinct prompt of a micro-batch once, or full rows",
    )  # fmt: skip
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--micro-one", help=argparse.SUPPRESS)
    p.add_argument("--share-one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        from shuffle_r1.precision import cpu_description

        args.layout = args.child
        print(json.dumps({"cpu": cpu_description(), **measure(args)}), flush=True)
        return
    for layout in args.layouts:
        for micro in args.micro:
            for share in args.share_prompts:
                row = {"bench": "learner", **child(layout, micro, share, args)}
                emit(row)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
