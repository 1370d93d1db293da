"""Algorithm benchmark: GRPO vs GRPO+PTS vs Shuffle-R1 (GRPO+PTS+ABS), same budget (issue #7).

The paper's headline (Shuffle-R1, §4: PTS+ABS reaches GRPO's accuracy in fewer steps) at
the scale one CPU machine runs: SmolLM2-135M-Instruct on two-digit addition
(``data/add2``, recipe ``bench/configs/arith_smollm2_cpu.yaml``). Every run has the
same model, data, rollout budget (8 prompts x n = 8 = 64 generated rollouts per step),
optimizer steps per training step and evaluation; runs differ only in ``algorithm.name``
and the seed (``trainer.seed`` = ``data.seed``: sampling, data order and ABS draws).

    python bench/algorithms.py sweep [--seeds 1 2 3] [--steps 16] [--out DIR]
    python bench/algorithms.py summarize [--out DIR]

``sweep`` runs each (algorithm, seed) as its own process (``run-one``: a fresh Ray, so one
failed run does not end the sweep) and skips runs already complete under ``--out``, so an
interrupted sweep continues where it stopped. Each run folder holds the trainer's
``metrics.jsonl``, whose ``step`` -1 row is the held-out accuracy before the first update.

``summarize`` prints one JSON object and writes ``summary.json`` and ``algorithms.png``
under ``--out``:

- ``val_accuracy``: held-out pass@1 (``rollout.val_n`` samples per problem at
  ``rollout.val_temperature``) per evaluated step, mean and sample std over seeds;
- ``steps_to_grpo_final``: the first evaluated step at which each algorithm's mean
  accuracy reaches GRPO's mean accuracy at its last step (None: never), and its ratio to
  GRPO's own such step (target: <= 0.5 for Shuffle-R1);
- ``collapse_share_before_pts`` / ``collapse_share_after_abs``: the share of rollouts with
  |A| < tau among all generated / among those trained on (docs/ALGORITHM.md §5), mean over steps
  and seeds; ``silence_ratio``: 1 - the non-zero-gradient share of the rollouts trained on
  (§5);
- ``step_s``: mean wall time of a training step, seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALGORITHMS = ("grpo", "grpo+pts", "shuffle_r1")
LABELS = {"grpo": "GRPO", "grpo+pts": "GRPO+PTS", "shuffle_r1": "GRPO+PTS+ABS (Shuffle-R1)"}
CONFIG = ROOT / "bench" / "configs" / "arith_smollm2_cpu.yaml"
OUT = ROOT / "outputs" / "bench" / "algorithms"
TRAIN_SERIES = (
    "reward/accuracy",
    "diag/collapse_share_before_pts",
    "diag/collapse_share_after_abs",
    "diag/silence_ratio",
)


def run_dir(out: Path, algorithm: str, seed: int) -> Path:
    return out / f"{algorithm.replace('+', '_')}-seed{seed}"


def run_one(algorithm: str, seed: int, steps: int, out: Path, config: Path) -> None:
    """Train one (algorithm, seed) run into :func:`run_dir`; writes ``done.json`` last."""
    from services.trainer.loop import Trainer
    from shuffle_r1.config import load_config

    folder = run_dir(out, algorithm, seed)
    cfg = load_config(
        config,
        [
            f"algorithm.name={algorithm}",
            f"trainer.seed={seed}",
            f"data.seed={seed}",
            f"trainer.total_steps={steps}",
            f"trainer.run_name=bench-{algorithm.replace('+', '-')}-s{seed}",
            f"trainer.output_dir={folder}",
        ],
    )
    started = time.perf_counter()
    with Trainer(cfg) as trainer:  # evaluates before the first update (step -1's row)
        summary = trainer.run()
    done = {"steps": summary.steps, "wall_s": time.perf_counter() - started}
    (folder / "done.json").write_text(json.dumps(done))


def sweep(seeds: Sequence[int], steps: int, out: Path, config: Path) -> int:
    """Run every missing (algorithm, seed) in turn, seeds outermost (so a partial sweep has
    all three algorithms for its first seeds). Returns the number of failed runs."""
    failed = 0
    for seed in seeds:
        for algorithm in ALGORITHMS:
            folder = run_dir(out, algorithm, seed)
            done = folder / "done.json"
            if done.is_file() and json.loads(done.read_text())["steps"] >= steps:
                print(f"[sweep] {folder.name}: complete, skipped", flush=True)
                continue
            folder.mkdir(parents=True, exist_ok=True)
            cmd = [
                sys.executable,
                __file__,
                "run-one",
                "--algorithm",
                algorithm,
                "--seed",
                str(seed),
                "--steps",
                str(steps),
                "--out",
                str(out),
                "--config",
                str(config),
            ]
            t = time.perf_counter()
            with (folder / "run.log").open("w") as log:
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            print(f"[sweep] {folder.name}: rc={rc} in {time.perf_counter() - t:.0f} s", flush=True)
            failed += rc != 0
    return failed


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def load_runs(out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """``{algorithm: {seed: {"eval": {step: accuracy}, "train": [row, ...]}}}`` for every
    complete run under ``out``. Evaluated steps count updates: 0 is the base model, k the
    model after k training steps (the trainer's row of step k-1)."""
    runs: dict[str, dict[int, dict[str, Any]]] = {a: {} for a in ALGORITHMS}
    for algorithm in ALGORITHMS:
        prefix = f"{algorithm.replace('+', '_')}-seed"
        for folder in sorted(out.glob(prefix + "*")):
            if not (folder / "done.json").is_file() or not folder.name[len(prefix) :].isdigit():
                continue
            rows = _read_jsonl(folder / "metrics.jsonl")  # step -1: the evaluation before
            evals = {r["step"] + 1: r["val/accuracy"] for r in rows if "val/accuracy" in r}
            train = [r for r in rows if r["step"] >= 0]
            runs[algorithm][int(folder.name[len(prefix) :])] = {"eval": evals, "train": train}
    return runs


def first_step_reaching(curve: dict[int, float], target: float) -> int | None:
    """The first evaluated step whose accuracy is >= ``target`` (1e-9 slack), or None."""
    return next((s for s in sorted(curve) if curve[s] >= target - 1e-9), None)


def summarize(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """The numbers described in the module docstring, from :func:`load_runs`' result.
    Only seeds that every algorithm completed are compared. Raises ``ValueError`` when no
    seed has all three algorithms."""
    seeds = sorted(set.intersection(*(set(runs[a]) for a in ALGORITHMS)))
    if not seeds:
        raise ValueError("no seed has a complete run of every algorithm; run the sweep first")
    result: dict[str, Any] = {"seeds": seeds, "algorithms": {}}
    mean_curves: dict[str, dict[int, float]] = {}
    for algorithm in ALGORITHMS:
        steps = sorted(set.intersection(*(set(runs[algorithm][s]["eval"]) for s in seeds)))
        curve = {
            step: _mean_sd([runs[algorithm][s]["eval"][step] for s in seeds]) for step in steps
        }
        mean_curves[algorithm] = {step: m for step, (m, _) in curve.items()}
        train: dict[str, float] = {}
        for key in (*TRAIN_SERIES, "time/step_s"):
            values = [r[key] for s in seeds for r in runs[algorithm][s]["train"] if key in r]
            train[key] = _mean_sd(values)[0]
        per_step = {
            key: [
                _mean_sd([runs[algorithm][s]["train"][i][key] for s in seeds])[0]
                for i in range(min(len(runs[algorithm][s]["train"]) for s in seeds))
            ]
            for key in TRAIN_SERIES
        }
        result["algorithms"][algorithm] = {
            "val_accuracy": {str(k): {"mean": m, "sd": sd} for k, (m, sd) in curve.items()},
            "final_val_accuracy": curve[steps[-1]][0],
            "best_val_accuracy": max(m for m, _ in curve.values()),
            "train_accuracy_mean": train["reward/accuracy"],
            "collapse_share_before_pts": train["diag/collapse_share_before_pts"],
            "collapse_share_after_abs": train["diag/collapse_share_after_abs"],
            "silence_ratio": train["diag/silence_ratio"],
            "step_s": train["time/step_s"],
            "per_step": per_step,
        }
    grpo = mean_curves["grpo"]
    target = grpo[max(grpo)]
    grpo_steps = first_step_reaching(grpo, target)
    result["grpo_final_val_accuracy"] = target
    for algorithm in ALGORITHMS:
        reached = first_step_reaching(mean_curves[algorithm], target)
        entry = result["algorithms"][algorithm]
        entry["steps_to_grpo_final"] = reached
        entry["steps_ratio_vs_grpo"] = (
            reached / grpo_steps if reached is not None and grpo_steps else None
        )
    return result


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Four panels: held-out accuracy (mean +- sd over seeds), training accuracy, advantage
    collapse after ABS and rollout silence, each against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    panels = [
        ("reward/accuracy", "training accuracy (generated rollouts)"),
        ("diag/collapse_share_after_abs", "advantage collapse |A|<tau, trained-on share"),
        ("diag/silence_ratio", "rollout silence ratio"),
    ]
    ax = axes[0][0]
    for algorithm, entry in summary["algorithms"].items():
        steps = [int(s) for s in entry["val_accuracy"]]
        means = [v["mean"] for v in entry["val_accuracy"].values()]
        sds = [v["sd"] for v in entry["val_accuracy"].values()]
        ax.plot(steps, means, marker="o", label=LABELS[algorithm])
        ax.fill_between(
            steps,
            [m - s for m, s in zip(means, sds, strict=True)],
            [m + s for m, s in zip(means, sds, strict=True)],
            alpha=0.15,
        )
    ax.axhline(summary["grpo_final_val_accuracy"], color="grey", ls=":", lw=1)
    ax.set_title(f"held-out accuracy, mean +- sd over seeds {summary['seeds']}")
    ax.legend(fontsize=8)
    for ax, (key, title) in zip([axes[0][1], axes[1][0], axes[1][1]], panels, strict=True):
        for algorithm, entry in summary["algorithms"].items():
            ys = entry["per_step"][key]
            ax.plot(range(1, len(ys) + 1), ys, label=LABELS[algorithm])
        ax.set_title(title)
    for ax in axes.flat:
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("sweep", "run-one", "summarize"):
        s = sub.add_parser(name)
        s.add_argument("--out", type=Path, default=OUT)
        if name != "summarize":
            s.add_argument("--steps", type=int, default=16)
            s.add_argument("--config", type=Path, default=CONFIG)
    sub.choices["sweep"].add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    sub.choices["run-one"].add_argument("--algorithm", choices=ALGORITHMS, required=True)
    sub.choices["run-one"].add_argument("--seed", type=int, required=True)
    args = p.parse_args(argv)
    os.chdir(ROOT)
    if args.command == "run-one":
        run_one(args.algorithm, args.seed, args.steps, args.out, args.config)
        return 0
    if args.command == "sweep":
        failed = sweep(args.seeds, args.steps, args.out, args.config)
        if failed:
            print(f"[sweep] {failed} run(s) failed; see run.log in their folders", flush=True)
    summary = summarize(load_runs(args.out))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, args.out / "algorithms.png")
    compact = {
        "seeds": summary["seeds"],
        "grpo_final_val_accuracy": summary["grpo_final_val_accuracy"],
        **{
            a: {k: v for k, v in e.items() if k not in ("per_step", "val_accuracy")}
            for a, e in summary["algorithms"].items()
        },
    }
    print(json.dumps(compact))
    return 0


if __name__ == "__main__":
    sys.exit(main())
