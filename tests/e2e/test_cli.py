"""The user's commands, as a user runs them: `shuffle-r1 train`, then `shuffle-r1 eval` on
the checkpoint it wrote (each starts its own local Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "services.cli"]
TINY = [
    "--config",
    "configs/tiny_cpu.yaml",
    "reward.function=tests.e2e.reward_fns:distinct_char_share",
]


def run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        CLI + args, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def test_train_then_eval_from_the_command_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [f"trainer.output_dir={out}", "trainer.total_steps=2", "trainer.eval_every=2",
            "trainer.loggers=[jsonl,tensorboard,mlflow]"]  # fmt: skip
    trained = run(["train", *TINY, *args])
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "trained 2 steps" in trained.stdout
    # evaluated before the first update and after the last, on the same 8 problems
    assert "held-out accuracy before training:" in trained.stdout
    assert "held-out accuracy after 2 steps:" in trained.stdout and "n = 8" in trained.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["n_eval"] == 8 and summary["after_step"] == 2
    assert summary["gain"] == pytest.approx(summary["acc_after"] - summary["acc_before"])
    assert summary["dtype"] == {"learner": "float32", "rollout": "float32"}  # the recipe's
    assert summary["wall_s"] > summary["train_s"] > 0
    ckpt = out / "checkpoints" / "step_000002"
    for line in (f"metrics:    {out / 'metrics.jsonl'}", f"checkpoint: {ckpt}"):
        assert line in trained.stdout
    assert (out / "metrics.png").stat().st_size > 0
    # the experiment trackers got every row, at training steps done (jsonl's step + 1)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    mlflow = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run_id = json.loads((out / "trackers.json").read_text())["mlflow"]
    assert mlflow.get_run(run_id).info.status == "FINISHED"
    for key in ("reward/mean", "learner/policy_loss", "val/accuracy"):
        curve = [(r["step"] + 1, r[key]) for r in rows if key in r]
        assert [e.step for e in events.Scalars(key)] == [s for s, _ in curve], key
        assert [e.value for e in events.Scalars(key)] == pytest.approx([v for _, v in curve])
        history = sorted((m.step, m.value) for m in mlflow.get_metric_history(run_id, key))
        assert history == curve, key
    assert [s for s, _ in curve] == [0, 2]  # val/accuracy: before training and after step 2

    # the run folder stands for its newest checkpoint; any dataset file, its first N problems
    evaluated = run(["eval", *TINY, f"trainer.output_dir={out}", "--checkpoint", str(out),
                     f"data.val_path={ROOT / 'data' / 'add2' / 'test.jsonl'}", "data.val_size=6",
                     "data.answer_format=raw"])  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["checkpoint"] == str(ckpt) and result["problems"] == 6
    assert result["model"] == str(ckpt / "learner" / "model")
    assert 0.0 <= result["accuracy"] <= 1.0 and result["eval_s"] > 0
    low, high = result["accuracy_ci95"]
    assert low <= result["accuracy"] <= high and high - low > 0.2  # 6 samples: a wide interval
    assert json.loads((out / "eval" / "eval_summary.json").read_text()) == result
    assert not (out / "eval" / "tensorboard").exists()  # evaluation logs no tracker run
    # evaluation writes beside the run, never over its metrics (step -1: before training)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [-1, 0, 1]

    missing = run(["eval", *TINY, "--checkpoint", str(tmp_path / "nope")])
    assert missing.returncode == 2 and "not a checkpoint" in missing.stderr
    no_data = run(["eval", *TINY, "--base", f"data.val_path={tmp_path / 'none.jsonl'}"])
    assert no_data.returncode == 2 and "none.jsonl is not a file" in no_data.stderr
    both = run(["eval", *TINY, "--base", "--checkpoint", str(ckpt)])
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
