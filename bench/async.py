"""Async benchmark: what does ``trainer.mode=async`` buy over ``sync``? (issue #21, item 6)

The embedded default's recipe (``configs/arith_smollm2_cpu.yaml``: SmolLM2-135M-Instruct on
two-digit addition, 8 prompts x n = 8 a step) in both modes with the same rollout budget,
the same prompts and sampling seeds per step (``trainer.seed`` = ``data.seed`` = the seed).
Arms (:data:`ARMS`):

- ``sync``: ``trainer.mode=sync`` (generate, score, update, publish in turn);
- ``async``: ``trainer.mode=async buffer.max_staleness=1`` (the rollout side generates the
  next step while the learner trains);
- ``sync-pinned`` / ``async-pinned``, the first seed only: the same with one core per role
  (one rollout thread, one learner rank of one thread), so on a 2-core machine the two sides
  do not compete for the same cores and the overlap can show.

Every run: ``--steps`` training steps (default 6), held-out accuracy on ``--val-size``
problems (default 100, greedy) before the first update and every 3 steps, no checkpoints.

    python bench/async.py sweep [--seeds 1 2] [--steps 6] [--val-size 100] [--arms ...] [--out DIR]
    python bench/async.py summarize [--out DIR] [--results DIR]

``sweep`` runs each (arm, seed) as its own process (``run-one``: a fresh Ray, so one failed
run does not end the sweep) in the order of :func:`plan` (seed 1 sync, async, pinned sync,
pinned async, then seed 2 sync, async: a partial sweep has its first pairs whole) and skips
runs already complete under ``--out`` (``done.json``, written last; default
``outputs/bench/async``). ``summarize`` (also run at the end of ``sweep``) reads the complete
runs, prints a table and writes ``async.json`` and ``async.png`` under ``--results`` (default
``bench/results``); see :func:`summarize` for what they hold. The full sweep (6 runs of 6
steps) takes about 70 minutes on a 2-core AVX2-only EPYC, where a 4-step run took 8-10
minutes (2.5 of them starting vLLM and the learner); the published results
(``bench/results/async.json``) are the first 4 runs at ``--steps 4 --val-size 64``.

The ``projection`` in ``async.json`` is arithmetic on the sync runs' measured phase times,
not a measurement: where rollout and learner have their own devices (a multi-GPU node) an
async step would take max(R, L) instead of R + L; it ignores the weight-transfer and
contention differences between this CPU machine and such a node.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import read_step_rows, run_missing, train_run  # noqa: E402

ASYNC = ["trainer.mode=async", "buffer.max_staleness=1"]
PINNED = ["rollout.threads_per_worker=1", "learner.num_ranks=1", "learner.threads_per_rank=1"]
# arm -> the overrides that make it; everything else comes from CONFIG and run_one
ARMS: dict[str, list[str]] = {
    "sync": ["trainer.mode=sync"],
    "async": ASYNC,
    "sync-pinned": ["trainer.mode=sync", *PINNED],
    "async-pinned": [*ASYNC, *PINNED],
}
PINNED_ARMS = ("sync-pinned", "async-pinned")  # run for the first seed only
TWIN = {"async": "sync", "async-pinned": "sync-pinned"}  # each async arm's sync twin
CONFIG = ROOT / "configs" / "arith_smollm2_cpu.yaml"
OUT = ROOT / "outputs" / "bench" / "async"
RESULTS = ROOT / "bench" / "results"
EVAL_EVERY = 3
LEARNER_PHASES = ("old_logprobs", "update", "publish", "buffer")  # L, each time/<phase>_s
ROLLOUT_PHASES = ("generate", "reward")  # R
PROJECTION_NOTE = (
    "projection, not a measurement: on a multi-GPU node where the rollout workers and the "
    "learner have their own devices, an async step would take max(R, L) instead of the sync "
    "step's R + L, R and L the medians of the sync runs' measured phases on this CPU machine. "
    "It ignores the weight-transfer and contention differences between the two machines."
)


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm}-seed{seed}"


def plan(seeds: Sequence[int], arms: Sequence[str] = tuple(ARMS)) -> list[tuple[str, int]]:
    """The (arm, seed) runs of a sweep in the order they run: per seed the sync then the async
    arm, the pinned pair after the first seed's default pair (first seed only)."""
    runs = []
    for i, seed in enumerate(seeds):
        for arm in ARMS:
            if arm in arms and (i == 0 or arm not in PINNED_ARMS):
                runs.append((arm, seed))
    return runs


def run_one(arm: str, seed: int, steps: int, val_size: int, out: Path, config: Path) -> None:
    """Train one (arm, seed) run into :func:`run_dir`; writes ``done.json`` last."""
    folder = run_dir(out, arm, seed)
    train_run(
        config,
        [
            *ARMS[arm],
            f"trainer.seed={seed}",
            f"data.seed={seed}",
            f"data.val_size={val_size}",
            f"trainer.total_steps={steps}",
            f"trainer.eval_every={EVAL_EVERY}",
            "trainer.val_before_train=true",
            "trainer.save_every=0",
            f"trainer.run_name=bench-async-{arm}-s{seed}",
            f"trainer.output_dir={folder}",
        ],
        folder,
    )


def sweep(
    seeds: Sequence[int], steps: int, val_size: int, arms: Sequence[str], out: Path, config: Path
) -> int:
    """Run every missing run of :func:`plan` in turn. Returns the number of failed runs."""
    runs = []
    for arm, seed in plan(seeds, arms):
        cmd = [
            sys.executable, __file__, "run-one", "--arm", arm, "--seed", str(seed),
            "--steps", str(steps), "--val-size", str(val_size), "--out", str(out),
            "--config", str(config),
        ]  # fmt: skip
        runs.append((run_dir(out, arm, seed), cmd))
    return run_missing(runs, steps)


def load_runs(out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """``{arm: {seed: run}}`` for every complete run (``done.json``) under ``out``. A run
    holds ``rows`` (metrics.jsonl, step -1 first: the evaluation before training) and
    ``summary`` (the trainer's summary.json: ``wall_s``, ``train_s``, ``cpu``)."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for arm in ARMS:
        prefix = f"{arm}-seed"
        for folder in sorted(out.glob(prefix + "*")):
            seed = folder.name[len(prefix) :]
            if not seed.isdigit() or not (folder / "done.json").is_file():
                continue
            runs.setdefault(arm, {})[int(seed)] = {
                "rows": read_step_rows(folder / "metrics.jsonl"),
                "summary": json.loads((folder / "summary.json").read_text()),
            }
    return runs


def _sum(rows: Sequence[dict[str, Any]], key: str) -> float:
    return sum(r.get(key) or 0.0 for r in rows)  # a phase a step did not run: 0


def _phase_s(row: dict[str, Any], phases: Sequence[str]) -> float:
    return sum(row.get(f"time/{p}_s") or 0.0 for p in phases)


def run_stats(run: dict[str, Any]) -> dict[str, Any]:
    """One run's numbers. ``wall_s`` is the training steps' wall (the sum of ``time/step_s``);
    rates and idle shares are over it, ``steps_per_hour_train_s`` over the trainer's
    ``train_s`` (its step loop with every evaluation). ``rollout_phase_s`` R and
    ``learner_phase_s`` L are medians over the steps (R = generate + reward, L = old
    log-probs + update + publish + buffer). ``val_accuracy`` and ``elapsed_s`` are keyed by
    updates done k (0: the model before training): the held-out accuracy after k steps, and
    the seconds of training and evaluation (cumulative ``time/step_s`` + ``time/eval_s``)
    until that evaluation ended. ``staleness`` is the mean over steps of each
    ``staleness/share_<k>`` (every step generates as many rollouts, so the pooled share)."""
    rows, summary = run["rows"], run["summary"]
    train = [r for r in rows if r["step"] >= 0]
    steps = len(train)
    wall = _sum(train, "time/step_s")
    val, elapsed, clock = {}, {}, 0.0
    for r in rows:
        clock += (r.get("time/step_s") or 0.0) + (r.get("time/eval_s") or 0.0)
        if "val/accuracy" in r:
            val[r["step"] + 1] = r["val/accuracy"]
            elapsed[r["step"] + 1] = clock
    shares = sorted({k for r in train for k in r if k.startswith("staleness/share_")})
    return {
        "steps": steps,
        "wall_s": wall,
        "train_s": summary["train_s"],
        "run_wall_s": summary["wall_s"],
        "steps_per_hour": 3600 * steps / wall,
        "steps_per_hour_train_s": 3600 * steps / summary["train_s"],
        "tokens_per_s": _sum(train, "rollout/tokens") / wall,
        "producer_idle_share": _sum(train, "time/producer_idle_s") / wall,
        "consumer_idle_share": _sum(train, "time/consumer_idle_s") / wall,
        "staleness": {k.split("/")[1]: _sum(train, k) / steps for k in shares},
        "staleness_max": max((r.get("staleness/max") or 0.0 for r in train), default=0.0),
        "median_step_s": statistics.median(r["time/step_s"] for r in train),
        "rollout_phase_s": statistics.median(_phase_s(r, ROLLOUT_PHASES) for r in train),
        "learner_phase_s": statistics.median(_phase_s(r, LEARNER_PHASES) for r in train),
        "val_accuracy": val,
        "elapsed_s": elapsed,
        "cpu": summary.get("cpu", ""),
    }


MEANED = (
    "steps_per_hour",
    "steps_per_hour_train_s",
    "tokens_per_s",
    "producer_idle_share",
    "consumer_idle_share",
    "median_step_s",
    "rollout_phase_s",
    "learner_phase_s",
)


def _mean_stats(per: dict[int, dict[str, Any]], pooled_rows: int) -> dict[str, Any]:
    """The mean over seeds of :data:`MEANED`, the staleness shares pooled over every step of
    every seed, and the accuracy / elapsed curves at the evaluations every seed made."""
    seeds = sorted(per)
    steps = {s: per[s]["steps"] for s in seeds}
    keys = sorted({k for s in seeds for k in per[s]["staleness"]})
    evals = sorted(set.intersection(*(set(per[s]["val_accuracy"]) for s in seeds)))
    return {
        **{k: statistics.fmean(per[s][k] for s in seeds) for k in MEANED},
        "staleness": {
            k: sum(per[s]["staleness"].get(k, 0.0) * steps[s] for s in seeds) / pooled_rows
            for k in keys
        },
        "val_accuracy": {
            k: statistics.fmean(per[s]["val_accuracy"][k] for s in seeds) for k in evals
        },
        "elapsed_s": {k: statistics.fmean(per[s]["elapsed_s"][k] for s in seeds) for k in evals},
        "cpus": sorted({per[s]["cpu"] for s in seeds}),
    }


def _ratios(
    stats: dict[str, dict[int, dict[str, Any]]], fast: str, slow: str
) -> dict[str, Any] | None:
    """``fast`` / ``slow`` steps per hour on every seed both arms completed (and their mean),
    from the steps' wall and from ``train_s``; None when no seed has both."""
    seeds = sorted(set(stats.get(fast, {})) & set(stats.get(slow, {})))
    if not seeds:
        return None
    out: dict[str, Any] = {"seeds": seeds}
    for key in ("steps_per_hour", "steps_per_hour_train_s"):
        per = {s: stats[fast][s][key] / stats[slow][s][key] for s in seeds}
        out[key] = {"per_seed": per, "mean": statistics.fmean(per.values())}
    return out


def _overlap(sync: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """An async run against its sync twin's phases (R, L): achieved speed-up (sync median
    step / async median step), the ideal (R + L) / max(R, L), their ratio (overlap
    efficiency) and the share of the possible gain realised, (achieved - 1) / (ideal - 1)."""
    r, lp = sync["rollout_phase_s"], sync["learner_phase_s"]
    ideal = (r + lp) / max(r, lp)
    achieved = sync["median_step_s"] / run["median_step_s"]
    return {
        "rollout_phase_s": r,
        "learner_phase_s": lp,
        "sync_median_step_s": sync["median_step_s"],
        "async_median_step_s": run["median_step_s"],
        "ideal_async_step_s": max(r, lp),
        "ideal_sync_step_s": r + lp,
        "achieved_speedup": achieved,
        "ideal_speedup": ideal,
        "overlap_efficiency": achieved / ideal,
        "gain_realised": (achieved - 1) / (ideal - 1) if ideal > 1 else None,
    }


def summarize(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """The comparison, over the complete runs (:func:`load_runs`).

    Returns a dict with ``arms`` (per arm: its overrides, ``per_seed`` :func:`run_stats`
    and ``mean`` over its seeds), ``ratios`` (async / sync steps per hour, ``default`` and
    ``pinned`` pairs, per seed and mean; None without a complete pair), ``overlap`` (per async
    arm, per seed: :func:`_overlap` against the sync twin of the same seed) and
    ``projection`` (per sync arm, per seed: R, L, the projected async step max(R, L) and
    speed-up (R + L) / max(R, L); see :data:`PROJECTION_NOTE`).

    Raises:
        ValueError: no run is complete.
    """
    if not any(runs.values()):
        raise ValueError("no complete run (done.json) to summarize; run the sweep first")
    stats = {arm: {s: run_stats(r) for s, r in per.items()} for arm, per in runs.items() if per}
    out: dict[str, Any] = {"arms": {}, "ratios": {}, "overlap": {}}
    for arm, per in stats.items():
        out["arms"][arm] = {
            "overrides": ARMS[arm],
            "seeds": sorted(per),
            "per_seed": per,
            "mean": _mean_stats(per, sum(p["steps"] for p in per.values())),
        }
    out["ratios"]["default"] = _ratios(stats, "async", "sync")
    out["ratios"]["pinned"] = _ratios(stats, "async-pinned", "sync-pinned")
    for arm, twin in TWIN.items():
        seeds = sorted(set(stats.get(arm, {})) & set(stats.get(twin, {})))
        if seeds:
            out["overlap"][arm] = {s: _overlap(stats[twin][s], stats[arm][s]) for s in seeds}
    projection: dict[str, Any] = {"note": PROJECTION_NOTE}
    for arm in TWIN.values():
        for seed, st in stats.get(arm, {}).items():
            r, lp = st["rollout_phase_s"], st["learner_phase_s"]
            projection.setdefault(arm, {})[seed] = {
                "rollout_phase_s": r,
                "learner_phase_s": lp,
                "sync_step_s": r + lp,
                "projected_async_step_s": max(r, lp),
                "projected_speedup": (r + lp) / max(r, lp),
            }
    out["projection"] = projection
    return out


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Two panels: held-out accuracy (mean over each arm's seeds) against updates done and
    against seconds of training and evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for arm, entry in summary["arms"].items():
        mean = entry["mean"]
        ks = sorted(mean["val_accuracy"])
        acc = [mean["val_accuracy"][k] for k in ks]
        label = f"{arm} (seeds {entry['seeds']})"
        style = "--" if arm.startswith("sync") else "-"
        axes[0].plot(ks, acc, style, marker="o", label=label)
        axes[1].plot([mean["elapsed_s"][k] for k in ks], acc, style, marker="o", label=label)
    titles = (
        ("held-out accuracy (greedy) against updates done", "training steps"),
        ("held-out accuracy against seconds of training + evaluation", "seconds"),
    )
    for ax, (title, xlabel) in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _jsonable(obj: Any) -> Any:
    """``obj`` with int dict keys (seeds, steps) as strings, for json.dumps."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    return obj


def table(summary: dict[str, Any]) -> str:
    """The numbers and ratios as text (per arm: each seed, then the mean)."""
    head = (
        f"{'arm':<13} {'seed':>4} {'steps/h':>8} {'(train_s)':>9} {'tok/s':>7} "
        f"{'prod idle':>9} {'cons idle':>9} {'step s':>7} {'R s':>6} {'L s':>6}  "
        f"staleness shares; held-out accuracy by updates done"
    )
    lines = [head, "-" * len(head)]
    for arm, entry in summary["arms"].items():
        rows = [(str(s), st) for s, st in entry["per_seed"].items()]
        if len(rows) > 1:
            rows.append(("mean", entry["mean"]))
        for seed, st in rows:
            shares = " ".join(f"{k[6:]}:{v:.2f}" for k, v in sorted(st["staleness"].items()))
            acc = " ".join(f"{k}:{v:.3f}" for k, v in sorted(st["val_accuracy"].items()))
            lines.append(
                f"{arm:<13} {seed:>4} {st['steps_per_hour']:>8.1f} "
                f"{st['steps_per_hour_train_s']:>9.1f} {st['tokens_per_s']:>7.1f} "
                f"{st['producer_idle_share']:>9.2f} {st['consumer_idle_share']:>9.2f} "
                f"{st['median_step_s']:>7.1f} {st['rollout_phase_s']:>6.1f} "
                f"{st['learner_phase_s']:>6.1f}  {shares}; {acc}"
            )
    cpus = sorted({c for e in summary["arms"].values() for c in e["mean"]["cpus"]})
    lines.append(f"cpu: {'; '.join(cpus)}")
    for pair, ratio in summary["ratios"].items():
        if ratio is None:
            lines.append(f"async/sync steps per hour, {pair} pair: no complete pair")
            continue
        for key in ("steps_per_hour", "steps_per_hour_train_s"):
            per = ", ".join(f"seed {s} {v:.3f}" for s, v in ratio[key]["per_seed"].items())
            lines.append(f"async/sync {key}, {pair} pair: {per}; mean {ratio[key]['mean']:.3f}")
    for arm, per in summary["overlap"].items():
        for seed, o in per.items():
            gain = "n/a" if o["gain_realised"] is None else f"{o['gain_realised']:.2f}"
            lines.append(
                f"overlap {arm} seed {seed}: R {o['rollout_phase_s']:.1f} s, L "
                f"{o['learner_phase_s']:.1f} s; speed-up achieved {o['achieved_speedup']:.3f} "
                f"(sync {o['sync_median_step_s']:.1f} s / async {o['async_median_step_s']:.1f} "
                f"s), ideal {o['ideal_speedup']:.3f}, efficiency {o['overlap_efficiency']:.2f}, "
                f"gain realised {gain}"
            )
    for arm, per in summary["projection"].items():
        if arm == "note":
            continue
        for seed, p in per.items():
            lines.append(
                f"projection (not measured) from {arm} seed {seed}: async step "
                f"{p['projected_async_step_s']:.1f} s instead of {p['sync_step_s']:.1f} s, "
                f"speed-up {p['projected_speedup']:.2f}"
            )
    lines.append(summary["projection"]["note"])
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("sweep", "run-one", "summarize"):
        s = sub.add_parser(name)
        s.add_argument("--out", type=Path, default=OUT)
        s.add_argument("--results", type=Path, default=RESULTS)
        if name != "summarize":
            s.add_argument("--steps", type=int, default=6)
            s.add_argument("--val-size", type=int, default=100)
            s.add_argument("--config", type=Path, default=CONFIG)
    sweep_p = sub.choices["sweep"]
    sweep_p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    sweep_p.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    sub.choices["run-one"].add_argument("--arm", choices=list(ARMS), required=True)
    sub.choices["run-one"].add_argument("--seed", type=int, required=True)
    args = p.parse_args(argv)
    os.chdir(ROOT)
    if args.command == "run-one":
        run_one(args.arm, args.seed, args.steps, args.val_size, args.out, args.config)
        return 0
    if args.command == "sweep":
        failed = sweep(args.seeds, args.steps, args.val_size, args.arms, args.out, args.config)
        if failed:
            print(f"[sweep] {failed} run(s) failed; see run.log in their folders", flush=True)
    summary = summarize(load_runs(args.out))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "async.json").write_text(json.dumps(_jsonable(summary), indent=1))
    plot(summary, args.results / "async.png")
    print(table(summary), flush=True)
    compact = {
        "ratios": summary["ratios"],
        "overlap": summary["overlap"],
        "arms": {a: {k: e["mean"][k] for k in MEANED} for a, e in summary["arms"].items()},
    }
    print(json.dumps(_jsonable(compact)), flush=True)  # the result line (bench/run_all.sh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
