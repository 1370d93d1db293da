"""Algorithm benchmark: does Shuffle-R1 pay off? GRPO vs GRPO+PTS vs Shuffle-R1 (issue #16).

The paper's claim (Shuffle-R1, §4: PTS+ABS reaches GRPO's accuracy in about half the
steps) tested at the paper's update structure, at the scale one CPU machine runs:
SmolLM2-135M-Instruct on two-digit addition (``data/add2``), recipe
``bench/configs/algorithms.yaml``. Three arms (:data:`ARMS`):

- ``grpo``: n = 8, trains on every rollout;
- ``grpo+pts``: n = 16, PTS keeps α = 0.5 (8 rollouts a group), no re-draw (S = 1);
- ``shuffle_r1``: n = 16, α = 0.5, ABS with S = 4, mini-batches interleaved
  (``algorithm.abs_minibatch_order``, the upstream layout).

All arms: the same prompts per step (8), the same **trained** rollouts per step (64), K = 4
optimizer steps per rollout batch, ``ppo_epochs`` 1, constant lr, the same clip,
temperature, response length and, for a seed, the same prompt order (``trainer.seed`` =
``data.seed`` = the seed). Held-out: all 200 test problems, greedy, before the first update
and every ``trainer.eval_every`` steps.

    python bench/algorithms.py sweep [--seeds 1 2 3 4] [--steps 16] [--out DIR]
    python bench/algorithms.py summarize [--out DIR] [--results DIR]

``sweep`` runs each (arm, seed) as its own process (``run-one``: a fresh Ray, so one
failed run does not end the sweep), seeds outermost, and skips runs already complete under
``--out`` (``done.json``, written last), so an interrupted sweep loses at most the run it
was in. ``summarize`` (also run at the end of ``sweep``) reads the complete runs and writes
``summary.json`` and ``algorithms.png`` under ``--results`` (default
``bench/results/algorithms``); see :func:`summarize` for what they hold.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import read_step_rows, run_missing, train_run  # noqa: E402

# arm -> the overrides that make it; everything else comes from CONFIG
# (in the order a seed runs them)
ARMS: dict[str, list[str]] = {
    "shuffle_r1": ["algorithm.name=shuffle_r1", "rollout.n=16", "algorithm.shuffle_times=4"],
    "grpo+pts": ["algorithm.name=grpo+pts", "rollout.n=16", "algorithm.shuffle_times=1"],
    "grpo": ["algorithm.name=grpo", "rollout.n=8"],
}
LABELS = {"grpo": "GRPO n=8", "grpo+pts": "GRPO+PTS n=16", "shuffle_r1": "Shuffle-R1 n=16 S=4"}
BASELINE = "grpo"
CONFIG = ROOT / "bench" / "configs" / "algorithms.yaml"
OUT = ROOT / "outputs" / "bench" / "algorithms"
RESULTS = ROOT / "bench" / "results" / "algorithms"
# per-step series of metrics.jsonl kept in summary.json (mean over seeds per step)
TRAIN_SERIES = (
    "reward/accuracy",
    "diag/collapse_share_before_pts",
    "diag/collapse_share_after_abs",
    "diag/silence_ratio",
    "buffer/shortfall",
    "abs/minibatches",
    "abs/pairs_per_minibatch",
    "abs/distinct_pairs_per_minibatch",
    "abs/max_multiplicity",
    "abs/distinct_pairs",
    "rollout/response_len_mean",
    "time/step_s",
)
# two-sided 95% Student t quantiles t_{0.975, df}, df = 1..30 (standard table)
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / f"{arm.replace('+', '_')}-seed{seed}"


def run_one(arm: str, seed: int, steps: int, out: Path, config: Path) -> None:
    """Train one (arm, seed) run into :func:`run_dir`; writes ``done.json`` last."""
    folder = run_dir(out, arm, seed)
    train_run(
        config,
        [
            *ARMS[arm],
            f"trainer.seed={seed}",
            f"data.seed={seed}",
            f"trainer.total_steps={steps}",
            f"trainer.run_name=bench-{arm.replace('+', '-')}-s{seed}",
            f"trainer.output_dir={folder}",
        ],
        folder,
    )


def sweep(seeds: Sequence[int], steps: int, out: Path, config: Path) -> int:
    """Run every missing (arm, seed) in turn, seeds outermost (so a partial sweep has every
    arm for its first seeds). Returns the number of failed runs."""
    runs = []
    for seed in seeds:
        for arm in ARMS:
            cmd = [
                sys.executable, __file__, "run-one", "--arm", arm, "--seed", str(seed),
                "--steps", str(steps), "--out", str(out), "--config", str(config),
            ]  # fmt: skip
            runs.append((run_dir(out, arm, seed), cmd))
    return run_missing(runs, steps)


def load_runs(out: Path) -> dict[str, dict[int, dict[str, Any]]]:
    """``{arm: {seed: run}}`` for every complete run under ``out``. A run holds ``eval``
    (``{k: accuracy}``, k = updates done: 0 is the base model, k the model after k training
    steps, i.e. the trainer's row of step k-1), ``train`` (the step rows), ``elapsed``
    (``{k: seconds of training and evaluation until that evaluation}``), ``generated``
    (rollouts generated per step) and ``n_val`` (held-out samples per evaluation)."""
    runs: dict[str, dict[int, dict[str, Any]]] = {a: {} for a in ARMS}
    for arm in ARMS:
        prefix = f"{arm.replace('+', '_')}-seed"
        for folder in sorted(out.glob(prefix + "*")):
            seed = folder.name[len(prefix) :]
            if not (folder / "done.json").is_file() or not seed.isdigit():
                continue
            rows = read_step_rows(folder / "metrics.jsonl")  # step -1: the evaluation before
            evals, elapsed, clock = {}, {}, 0.0
            for r in rows:
                clock += r.get("time/step_s", 0.0) + r.get("time/eval_s", 0.0)
                if "val/accuracy" in r:
                    evals[r["step"] + 1] = r["val/accuracy"]
                    elapsed[r["step"] + 1] = clock
            train = [r for r in rows if r["step"] >= 0]
            n = next(int(a.split("=")[1]) for a in ARMS[arm] if a.startswith("rollout.n="))
            prompts = _prompts_per_step(folder)
            runs[arm][int(seed)] = {
                "eval": evals,
                "elapsed": elapsed,
                "train": train,
                "generated": n * prompts,
                "n_val": int(next((r["val/samples"] for r in rows if "val/samples" in r), 0)),
            }
    return runs


def _prompts_per_step(folder: Path) -> int:
    rows = read_step_rows(folder / "prompts.jsonl")
    return len(rows[0]["prompt_ids"]) if rows else 0


def mean_ci(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample sd and the 95% t interval of the mean over ``values`` (NaN where there
    are too few values)."""
    if not values:
        return {"mean": math.nan, "sd": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
    mean = statistics.fmean(values)
    if len(values) < 2:
        return {"mean": mean, "sd": math.nan, "lo": math.nan, "hi": math.nan, "n": 1}
    sd = statistics.stdev(values)
    half = T975[min(len(values) - 1, len(T975)) - 1] * sd / math.sqrt(len(values))
    return {"mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half, "n": len(values)}


def _mean_of(values: Sequence[Any]) -> float | None:
    """The mean of the finite numbers among ``values`` (a metric may be missing, or null in
    metrics.jsonl when it was NaN: e.g. the silence ratio of a step without an update), or
    None when there are none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    return statistics.fmean(finite) if finite else None


def first_reaching(curve: dict[int, float], target: float) -> int | None:
    """The first evaluated step whose accuracy is >= ``target`` (1e-9 slack), or None."""
    return next((s for s in sorted(curve) if curve[s] >= target - 1e-9), None)


def summarize(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """The analysis the claim needs, over the seeds every arm completed.

    Returns a dict with, per arm (``arms``): ``curves`` (per seed: held-out accuracy at each
    evaluated step, and the seconds it took to get there), ``val_accuracy`` (per step: mean,
    sd, 95% t interval over seeds), ``per_step`` (mean over seeds of :data:`TRAIN_SERIES`),
    ``steps_to_baseline_final`` (first evaluated step at which the arm's mean reaches GRPO's
    final mean; None: never) with the same in generated rollouts and in seconds, collapse /
    silence / ABS means; and ``paired_difference`` (per arm other than GRPO, per evaluated
    step: the mean over seeds of arm − GRPO on the same seed, its 95% t interval), the
    baseline's ``final_slope`` (accuracy per step over its last ``eval_every``-step
    interval) and the per-run binomial s.e. of one evaluation.

    Raises:
        ValueError: no seed has a complete run of every arm.
    """
    seeds = sorted(set.intersection(*(set(runs[a]) for a in ARMS)))
    if not seeds:
        raise ValueError("no seed has a complete run of every arm; run the sweep first")
    steps = sorted(set.intersection(*(set(runs[a][s]["eval"]) for a in ARMS for s in seeds)))
    out: dict[str, Any] = {"seeds": seeds, "eval_steps": steps, "arms": {}}
    means: dict[str, dict[int, float]] = {}
    for arm in ARMS:
        per = {s: runs[arm][s] for s in seeds}
        curve = {k: mean_ci([per[s]["eval"][k] for s in seeds]) for k in steps}
        means[arm] = {k: c["mean"] for k, c in curve.items()}
        length = min(len(per[s]["train"]) for s in seeds)
        series = {
            key: [_mean_of([per[s]["train"][i].get(key) for s in seeds]) for i in range(length)]
            for key in TRAIN_SERIES
        }
        overall = {
            key: statistics.fmean(v) if (v := [x for x in series[key] if x is not None]) else None
            for key in TRAIN_SERIES
        }
        out["arms"][arm] = {
            "label": LABELS[arm],
            "overrides": ARMS[arm],
            "generated_per_step": per[seeds[0]]["generated"],
            "curves": {
                str(s): {
                    "val_accuracy": {str(k): per[s]["eval"][k] for k in steps},
                    "elapsed_s": {str(k): per[s]["elapsed"][k] for k in steps},
                }
                for s in seeds
            },
            "val_accuracy": {str(k): c for k, c in curve.items()},
            "final_val_accuracy": curve[steps[-1]],
            "per_step": series,
            "means": overall,
        }
    base = means[BASELINE]
    target = base[steps[-1]]
    base_reached = first_reaching(base, target)
    out["baseline"] = BASELINE
    out["baseline_final_val_accuracy"] = target
    if len(steps) >= 2:
        k0, k1 = steps[-2], steps[-1]
        out["baseline_final_slope_per_step"] = (base[k1] - base[k0]) / (k1 - k0)
    n_val = min(runs[a][s]["n_val"] for a in ARMS for s in seeds)
    out["n_val"] = n_val
    out["binomial_se_one_eval"] = math.sqrt(target * (1 - target) / n_val) if n_val else None
    for arm in ARMS:
        entry = out["arms"][arm]
        reached = first_reaching(means[arm], target)
        elapsed = {k: statistics.fmean(runs[arm][s]["elapsed"][k] for s in seeds) for k in steps}
        entry["steps_to_baseline_final"] = reached
        entry["steps_ratio_vs_baseline"] = (
            reached / base_reached if reached is not None and base_reached else None
        )
        entry["rollouts_to_baseline_final"] = (
            reached * entry["generated_per_step"] if reached is not None else None
        )
        entry["seconds_to_baseline_final"] = elapsed[reached] if reached is not None else None
        entry["mean_elapsed_s"] = {str(k): v for k, v in elapsed.items()}
        if arm == BASELINE:
            continue
        entry["paired_difference"] = {
            str(k): mean_ci([runs[arm][s]["eval"][k] - runs[BASELINE][s]["eval"][k] for s in seeds])
            for k in steps
        }
        trained = [k for k in steps if k > 0]
        entry["paired_difference_mean_over_steps"] = mean_ci(
            [
                statistics.fmean(runs[arm][s]["eval"][k] - runs[BASELINE][s]["eval"][k]
                                 for k in trained)
                for s in seeds
            ]
        )  # fmt: skip
    return out


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Four panels: held-out accuracy per step (mean, 95% interval over seeds); the paired
    difference to GRPO per step (95% interval); held-out accuracy against generated
    rollouts and against wall-clock seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    steps = summary["eval_steps"]
    for entry in summary["arms"].values():
        ys = [entry["val_accuracy"][str(k)] for k in steps]
        means = [y["mean"] for y in ys]
        line = axes[0][0].plot(steps, means, marker="o", label=entry["label"])[0]
        axes[0][0].fill_between(
            steps, [y["lo"] for y in ys], [y["hi"] for y in ys], alpha=0.15, color=line.get_color()
        )
        gen = entry["generated_per_step"]
        axes[1][0].plot([k * gen for k in steps], means, marker="o", label=entry["label"])
        secs = [entry["mean_elapsed_s"][str(k)] for k in steps]
        axes[1][1].plot(secs, means, marker="o", label=entry["label"])
        if "paired_difference" in entry:
            d = [entry["paired_difference"][str(k)] for k in steps]
            axes[0][1].errorbar(
                steps,
                [x["mean"] for x in d],
                yerr=[[x["mean"] - x["lo"] for x in d], [x["hi"] - x["mean"] for x in d]],
                marker="o",
                capsize=3,
                color=line.get_color(),
                label=f"{entry['label']} − GRPO",
            )
    axes[0][1].axhline(0, color="grey", lw=1)
    for ax in (axes[0][0], axes[1][0], axes[1][1]):
        ax.axhline(summary["baseline_final_val_accuracy"], color="grey", ls=":", lw=1)
    titles = [
        (f"held-out accuracy (200, greedy), mean and 95% CI, seeds {summary['seeds']}",
         "training step"),
        ("paired difference to GRPO, same seed, 95% CI", "training step"),
        ("held-out accuracy against rollouts generated", "rollouts generated"),
        ("held-out accuracy against seconds of training + evaluation", "seconds"),
    ]  # fmt: skip
    for ax, (title, xlabel) in zip(axes.flat, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
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
        s.add_argument("--results", type=Path, default=RESULTS)
        if name != "summarize":
            s.add_argument("--steps", type=int, default=16)
            s.add_argument("--config", type=Path, default=CONFIG)
    sub.choices["sweep"].add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    sub.choices["run-one"].add_argument("--arm", choices=list(ARMS), required=True)
    sub.choices["run-one"].add_argument("--seed", type=int, required=True)
    args = p.parse_args(argv)
    os.chdir(ROOT)
    if args.command == "run-one":
        run_one(args.arm, args.seed, args.steps, args.out, args.config)
        return 0
    if args.command == "sweep":
        failed = sweep(args.seeds, args.steps, args.out, args.config)
        if failed:
            print(f"[sweep] {failed} run(s) failed; see run.log in their folders", flush=True)
    summary = summarize(load_runs(args.out))
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(summary, args.results / "algorithms.png")
    compact = {
        "seeds": summary["seeds"],
        "baseline_final_val_accuracy": summary["baseline_final_val_accuracy"],
        "baseline_final_slope_per_step": summary.get("baseline_final_slope_per_step"),
        **{
            a: {
                "final": e["final_val_accuracy"],
                "steps_to_baseline_final": e["steps_to_baseline_final"],
                "paired_difference_final": e.get("paired_difference", {}).get(
                    str(summary["eval_steps"][-1])
                ),
            }
            for a, e in summary["arms"].items()
        },
    }
    print(json.dumps(compact))
    return 0


if __name__ == "__main__":
    sys.exit(main())
