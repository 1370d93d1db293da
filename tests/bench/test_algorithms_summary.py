"""bench/algorithms.py's summary: steps-to-target, seed means, paired differences with their
interval and the per-step series, on run folders written the way the trainer writes them
(metrics.jsonl, whose step -1 row is the evaluation before training; prompts.jsonl)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_algorithms", ROOT / "bench" / "algorithms.py")
assert spec is not None and spec.loader is not None
algorithms = importlib.util.module_from_spec(spec)
spec.loader.exec_module(algorithms)


def write_run(
    out: Path,
    algorithm: str,
    seed: int,
    curve: dict[int, float],
    collapse: float,
    complete: bool = True,
) -> None:
    """A run folder: eval accuracy ``curve`` {updates: accuracy} (0 = base model), four
    training steps whose collapse share after ABS is ``collapse``."""
    folder = algorithms.run_dir(out, algorithm, seed)
    folder.mkdir(parents=True)
    before = {"step": -1, "val/accuracy": curve[0], "val/samples": 200.0, "time/eval_s": 5.0}
    rows: list[dict[str, float]] = [before]
    for step in range(4):
        row = {
            "step": step,
            "reward/accuracy": 0.1 * step,
            "diag/collapse_share_before_pts": 0.5,
            "diag/collapse_share_after_abs": collapse,
            "diag/silence_ratio": 0.25,
            "time/step_s": 10.0 + seed,
        }
        if step + 1 in curve:
            row.update({"val/accuracy": curve[step + 1], "val/samples": 200.0, "time/eval_s": 5.0})
        rows.append(row)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts = [{"step": s, "prompt_ids": [f"p{s}-{i}" for i in range(8)]} for s in range(4)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    if complete:
        (folder / "done.json").write_text(json.dumps({"steps": 4, "wall_s": 1.0}))


def test_steps_to_grpo_final_and_paired_differences(tmp_path: Path) -> None:
    # GRPO's mean over seeds: 0.2, 0.25, 0.4 -> its final 0.4 first reached at step 4.
    write_run(tmp_path, "grpo", 1, {0: 0.2, 2: 0.2, 4: 0.4}, 0.5)
    write_run(tmp_path, "grpo", 2, {0: 0.2, 2: 0.3, 4: 0.4}, 0.5)
    # GRPO+PTS: mean 0.2, 0.35, 0.35 -> never reaches 0.4.
    write_run(tmp_path, "grpo+pts", 1, {0: 0.2, 2: 0.3, 4: 0.3}, 0.2)
    write_run(tmp_path, "grpo+pts", 2, {0: 0.2, 2: 0.4, 4: 0.4}, 0.2)
    # Shuffle-R1: mean 0.2, 0.45, 0.5 -> reaches 0.4 at step 2, half of GRPO's steps.
    write_run(tmp_path, "shuffle_r1", 1, {0: 0.2, 2: 0.5, 4: 0.5}, 0.0)
    write_run(tmp_path, "shuffle_r1", 2, {0: 0.2, 2: 0.4, 4: 0.5}, 0.0)
    summary = algorithms.summarize(algorithms.load_runs(tmp_path))

    assert summary["seeds"] == [1, 2] and summary["eval_steps"] == [0, 2, 4]
    assert summary["baseline_final_val_accuracy"] == pytest.approx(0.4)
    assert summary["baseline_final_slope_per_step"] == pytest.approx((0.4 - 0.25) / 2)
    assert summary["binomial_se_one_eval"] == pytest.approx((0.4 * 0.6 / 200) ** 0.5)
    grpo, pts, sr1 = (summary["arms"][a] for a in ("grpo", "grpo+pts", "shuffle_r1"))
    assert grpo["steps_to_baseline_final"] == 4 and grpo["steps_ratio_vs_baseline"] == 1.0
    assert pts["steps_to_baseline_final"] is None and pts["steps_ratio_vs_baseline"] is None
    assert sr1["steps_to_baseline_final"] == 2 and sr1["steps_ratio_vs_baseline"] == 0.5
    assert sr1["generated_per_step"] == 8 * 16 and grpo["generated_per_step"] == 8 * 8
    assert sr1["rollouts_to_baseline_final"] == 2 * 128
    # seconds until the step-2 evaluation: eval 5 + two steps of 10 + seed + eval 5
    assert sr1["seconds_to_baseline_final"] == pytest.approx(5 + 2 * 11.5 + 5)
    acc = sr1["val_accuracy"]["2"]
    assert acc["mean"] == pytest.approx(0.45) and acc["sd"] == pytest.approx(0.0707, abs=1e-3)
    # 95% t interval with 1 degree of freedom: mean +- 12.706 * sd / sqrt(2)
    assert acc["hi"] - acc["mean"] == pytest.approx(12.706 * 0.0707107 / 2**0.5, rel=1e-4)
    diff = sr1["paired_difference"]["2"]  # seed 1: 0.5 - 0.2, seed 2: 0.4 - 0.3
    assert diff["mean"] == pytest.approx(0.2) and diff["n"] == 2
    assert sr1["paired_difference"]["0"]["mean"] == pytest.approx(0.0)
    assert "paired_difference" not in grpo
    assert sr1["means"]["diag/collapse_share_after_abs"] == 0.0
    assert grpo["means"]["diag/collapse_share_after_abs"] == 0.5
    assert grpo["per_step"]["reward/accuracy"] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert grpo["means"]["time/step_s"] == pytest.approx(11.5)  # 10 + seed, seeds 1 and 2
    assert grpo["curves"]["1"]["val_accuracy"] == {"0": 0.2, "2": 0.2, "4": 0.4}

    png = algorithms.plot(summary, tmp_path / "algorithms.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mean_ci() -> None:
    ci = algorithms.mean_ci([0.1, 0.2, 0.3, 0.4])
    assert ci["mean"] == pytest.approx(0.25)
    assert ci["hi"] - ci["mean"] == pytest.approx(3.182 * 0.1290994 / 2, rel=1e-4)
    assert algorithms.mean_ci([0.3])["n"] == 1


def test_only_seeds_complete_for_every_algorithm_count(tmp_path: Path) -> None:
    for arm in algorithms.ARMS:
        write_run(tmp_path, arm, 1, {0: 0.2, 4: 0.3}, 0.1)
    # Seed 2 has GRPO only, and seed 3's Shuffle-R1 run stopped before done.json.
    write_run(tmp_path, "grpo", 2, {0: 0.9, 4: 0.9}, 0.1)
    write_run(tmp_path, "grpo", 3, {0: 0.9, 4: 0.9}, 0.1)
    write_run(tmp_path, "grpo+pts", 3, {0: 0.9, 4: 0.9}, 0.1)
    write_run(tmp_path, "shuffle_r1", 3, {0: 0.9, 4: 0.9}, 0.1, complete=False)
    summary = algorithms.summarize(algorithms.load_runs(tmp_path))
    assert summary["seeds"] == [1]
    assert summary["baseline_final_val_accuracy"] == pytest.approx(0.3)


def test_no_complete_seed_is_an_error(tmp_path: Path) -> None:
    write_run(tmp_path, "grpo", 1, {0: 0.2, 4: 0.3}, 0.1)
    with pytest.raises(ValueError, match="no seed has a complete run of every arm"):
        algorithms.summarize(algorithms.load_runs(tmp_path))


def test_first_step_reaching() -> None:
    assert algorithms.first_reaching({0: 0.1, 4: 0.3, 8: 0.2}, 0.3) == 4
    assert algorithms.first_reaching({0: 0.1, 4: 0.2}, 0.3) is None


def test_a_null_metric_of_a_skipped_update_is_left_out_of_the_means(tmp_path: Path) -> None:
    for arm in algorithms.ARMS:
        for seed in (1, 2):
            write_run(tmp_path, arm, seed, {0: 0.2, 4: 0.3}, 0.1)
    # seed 2's step 1 had no update: its silence ratio was NaN, written as null
    path = algorithms.run_dir(tmp_path, "shuffle_r1", 2) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[2]["diag/silence_ratio"] = None
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = algorithms.summarize(algorithms.load_runs(tmp_path))
    assert summary["arms"]["shuffle_r1"]["per_step"]["diag/silence_ratio"] == [0.25] * 4
