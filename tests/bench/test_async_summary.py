"""bench/async.py's summary: steps per hour, tokens per second, idle shares, pooled staleness,
accuracy per step and per second, the async / sync ratios, the overlap against the sync twin's
phases and the projection, on run folders written the way the trainer writes them
(metrics.jsonl, whose step -1 row is the evaluation before training; summary.json). Every
expected number is worked out by hand in the comments."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
# "async" is a keyword: the module cannot be imported by name
spec = importlib.util.spec_from_file_location("bench_async", ROOT / "bench" / "async.py")
assert spec is not None and spec.loader is not None
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

CPU = "Test CPU, 2 CPUs, avx2"


def sync_rows(x: float, final_acc: float) -> list[dict[str, Any]]:
    """Two sync steps, every time multiplied by ``x``. At x = 1: steps of 10 and 14 s, rollout
    phases (generate + reward) 6 and 8 s, learner phases (buffer + old log-probs + update +
    publish) 4 and 6 s, evaluations of 4 s before and after."""
    return [
        {"step": -1, "val/accuracy": 0.2, "val/samples": 10.0, "time/eval_s": 4 * x},
        {
            "step": 0, "time/step_s": 10 * x, "time/generate_s": 5 * x, "time/reward_s": 1 * x,
            "time/buffer_s": 0.5 * x, "time/old_logprobs_s": 0.5 * x, "time/update_s": 2.5 * x,
            "time/publish_s": 0.5 * x, "time/producer_idle_s": 4 * x,
            "time/consumer_idle_s": 6 * x, "staleness/mean": 0.0, "staleness/max": 0.0,
            "staleness/share_0": 1.0, "rollout/tokens": 1000.0,
        },
        {
            "step": 1, "time/step_s": 14 * x, "time/generate_s": 7 * x, "time/reward_s": 1 * x,
            "time/buffer_s": 0.5 * x, "time/old_logprobs_s": 1.5 * x, "time/update_s": 3.5 * x,
            "time/publish_s": 0.5 * x, "time/producer_idle_s": 6 * x,
            "time/consumer_idle_s": 8 * x, "staleness/mean": 0.0, "staleness/max": 0.0,
            "staleness/share_0": 1.0, "rollout/tokens": 1400.0, "val/accuracy": final_acc,
            "val/samples": 10.0, "time/eval_s": 4 * x,
        },
    ]  # fmt: skip


def async_rows() -> list[dict[str, Any]]:
    """Two async steps: 12 s (the learner waits 7 s for the first rollouts) and 6 s, the second
    a quarter fresh, three quarters one version stale; evaluations of 4 and 6 s."""
    return [
        {"step": -1, "val/accuracy": 0.2, "val/samples": 10.0, "time/eval_s": 4.0},
        {
            "step": 0, "time/step_s": 12.0, "time/generate_s": 5.0, "time/reward_s": 1.0,
            "time/buffer_s": 0.5, "time/update_s": 3.0, "time/publish_s": 0.5,
            "time/producer_idle_s": 0.0, "time/consumer_idle_s": 7.0, "staleness/mean": 0.0,
            "staleness/max": 0.0, "staleness/share_0": 1.0, "staleness/share_1": 0.0,
            "rollout/tokens": 1000.0,
        },
        {
            "step": 1, "time/step_s": 6.0, "time/generate_s": 5.0, "time/reward_s": 1.0,
            "time/buffer_s": 0.5, "time/update_s": 4.0, "time/publish_s": 0.5,
            "time/producer_idle_s": 2.0, "time/consumer_idle_s": 1.0, "staleness/mean": 0.75,
            "staleness/max": 1.0, "staleness/share_0": 0.25, "staleness/share_1": 0.75,
            "rollout/tokens": 1200.0, "val/accuracy": 0.5, "val/samples": 10.0,
            "time/eval_s": 6.0,
        },
    ]  # fmt: skip


def write_run(
    out: Path, arm: str, seed: int, rows: list[dict[str, Any]], train_s: float, done: bool = True
) -> None:
    folder = bench.run_dir(out, arm, seed)
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"cpu": CPU, "steps": 2, "wall_s": train_s + 30, "train_s": train_s}
    (folder / "summary.json").write_text(json.dumps(summary))
    if done:
        (folder / "done.json").write_text(json.dumps({"steps": 2}))


def write_sweep(out: Path) -> None:
    write_run(out, "sync", 1, sync_rows(1, 0.4), train_s=36.0)
    write_run(out, "async", 1, async_rows(), train_s=30.0)
    write_run(out, "sync", 2, sync_rows(2, 0.6), train_s=72.0)  # every time doubled
    write_run(out, "async", 2, async_rows(), train_s=30.0)
    write_run(out, "sync-pinned", 1, sync_rows(2, 0.4), train_s=72.0)
    write_run(out, "async-pinned", 1, async_rows(), train_s=30.0)
    write_run(out, "async-pinned", 2, async_rows(), train_s=30.0, done=False)  # interrupted


def test_run_numbers_ratios_overlap_and_projection(tmp_path: Path) -> None:
    write_sweep(tmp_path)
    summary = bench.summarize(bench.load_runs(tmp_path))

    sync1 = summary["arms"]["sync"]["per_seed"][1]
    assert sync1["steps"] == 2 and sync1["wall_s"] == pytest.approx(24.0)  # 10 + 14
    assert sync1["steps_per_hour"] == pytest.approx(300.0)  # 2 steps / 24 s
    assert sync1["steps_per_hour_train_s"] == pytest.approx(200.0)  # 2 / 36 s
    assert sync1["tokens_per_s"] == pytest.approx(100.0)  # 2400 / 24
    assert sync1["producer_idle_share"] == pytest.approx(10 / 24)  # (4 + 6) / 24
    assert sync1["consumer_idle_share"] == pytest.approx(14 / 24)  # (6 + 8) / 24
    assert sync1["median_step_s"] == pytest.approx(12.0)
    assert sync1["rollout_phase_s"] == pytest.approx(7.0)  # median(6, 8)
    assert sync1["learner_phase_s"] == pytest.approx(5.0)  # median(4, 6)
    assert sync1["staleness"] == {"share_0": 1.0}
    assert sync1["val_accuracy"] == {0: 0.2, 2: 0.4}
    assert sync1["elapsed_s"] == pytest.approx({0: 4.0, 2: 32.0})  # 4 + 10 + 14 + 4
    assert sync1["cpu"] == CPU

    async1 = summary["arms"]["async"]["per_seed"][1]
    assert async1["steps_per_hour"] == pytest.approx(400.0)  # 2 / (12 + 6)
    assert async1["steps_per_hour_train_s"] == pytest.approx(240.0)  # 2 / 30
    assert async1["tokens_per_s"] == pytest.approx(2200 / 18)
    assert async1["producer_idle_share"] == pytest.approx(2 / 18)
    assert async1["consumer_idle_share"] == pytest.approx(8 / 18)
    assert async1["staleness"] == pytest.approx({"share_0": 0.625, "share_1": 0.375})
    assert async1["staleness_max"] == 1.0
    assert async1["median_step_s"] == pytest.approx(9.0)
    assert async1["learner_phase_s"] == pytest.approx(4.5)  # no old log-probs row: 0; (4 + 5) / 2
    assert async1["elapsed_s"] == pytest.approx({0: 4.0, 2: 28.0})  # 4 + 12 + 6 + 6

    sync = summary["arms"]["sync"]
    assert sync["seeds"] == [1, 2]
    assert sync["mean"]["steps_per_hour"] == pytest.approx(225.0)  # (300 + 150) / 2
    assert sync["mean"]["val_accuracy"] == pytest.approx({0: 0.2, 2: 0.5})
    assert sync["mean"]["elapsed_s"] == pytest.approx({0: 6.0, 2: 48.0})  # (4+8)/2, (32+64)/2
    assert sync["mean"]["cpus"] == [CPU]
    # the staleness shares pool every step of both seeds: (2 x 0.625 + 2 x 0.625) / 4
    assert summary["arms"]["async"]["mean"]["staleness"] == pytest.approx(
        {"share_0": 0.625, "share_1": 0.375}
    )
    # seed 2's pinned async run has no done.json
    assert summary["arms"]["async-pinned"]["seeds"] == [1]

    default = summary["ratios"]["default"]
    assert default["seeds"] == [1, 2]
    # seed 1: 400 / 300; seed 2: 400 / 150
    assert default["steps_per_hour"]["per_seed"] == pytest.approx({1: 4 / 3, 2: 8 / 3})
    assert default["steps_per_hour"]["mean"] == pytest.approx(2.0)
    # from train_s: 240 / 200 and 240 / 100
    assert default["steps_per_hour_train_s"]["per_seed"] == pytest.approx({1: 1.2, 2: 2.4})
    pinned = summary["ratios"]["pinned"]
    assert pinned["seeds"] == [1] and pinned["steps_per_hour"]["mean"] == pytest.approx(8 / 3)

    o = summary["overlap"]["async"][1]  # against sync seed 1: R = 7, L = 5
    assert o["ideal_async_step_s"] == 7.0 and o["ideal_sync_step_s"] == 12.0
    assert o["achieved_speedup"] == pytest.approx(12 / 9)  # median sync 12 s / async 9 s
    assert o["ideal_speedup"] == pytest.approx(12 / 7)  # (7 + 5) / max(7, 5)
    assert o["overlap_efficiency"] == pytest.approx(7 / 9)  # (4/3) / (12/7)
    assert o["gain_realised"] == pytest.approx(7 / 15)  # (1/3) / (5/7)
    op = summary["overlap"]["async-pinned"]
    assert list(op) == [1] and op[1]["rollout_phase_s"] == pytest.approx(14.0)  # sync-pinned

    proj = summary["projection"]
    assert "projection" in proj["note"] and "ignores the weight-transfer" in proj["note"]
    assert set(proj) == {"note", "sync", "sync-pinned"}
    assert proj["sync"][2] == pytest.approx(
        {
            "rollout_phase_s": 14.0,
            "learner_phase_s": 10.0,
            "sync_step_s": 24.0,
            "projected_async_step_s": 14.0,
            "projected_speedup": 24 / 14,
        }
    )

    text = bench.table(summary)
    assert "async/sync steps_per_hour, default pair: seed 1 1.333, seed 2 2.667; mean 2.000" in text
    json.dumps(bench._jsonable(summary))  # int keys become strings
    png = bench.plot(summary, tmp_path / "async.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_partial_sweep_has_no_ratio_for_a_missing_pair(tmp_path: Path) -> None:
    write_run(tmp_path, "sync", 1, sync_rows(1, 0.4), train_s=36.0)
    write_run(tmp_path, "async", 1, async_rows(), train_s=30.0)
    summary = bench.summarize(bench.load_runs(tmp_path))
    assert summary["ratios"]["pinned"] is None and list(summary["overlap"]) == ["async"]
    assert "pinned pair: no complete pair" in bench.table(summary)


def test_no_complete_run_is_an_error(tmp_path: Path) -> None:
    write_run(tmp_path, "sync", 1, sync_rows(1, 0.4), train_s=36.0, done=False)
    with pytest.raises(ValueError, match="no complete run"):
        bench.summarize(bench.load_runs(tmp_path))


def test_sweep_order() -> None:
    assert bench.plan([1, 2]) == [
        ("sync", 1), ("async", 1), ("sync-pinned", 1), ("async-pinned", 1),
        ("sync", 2), ("async", 2),
    ]  # fmt: skip
    assert bench.plan([1], ["sync", "async"]) == [("sync", 1), ("async", 1)]
