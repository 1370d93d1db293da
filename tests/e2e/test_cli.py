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
CLI = [sys.executable, "-m", "shuffle_r1.cli"]
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
    args = [f"trainer.output_dir={out}", "trainer.total_steps=2", "trainer.eval_every=2"]
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

    evaluated = run(["eval", *TINY, f"trainer.output_dir={out}", "--checkpoint", str(ckpt)])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert 0.0 <= result["val/accuracy"] <= 1.0 and result["time/eval_s"] > 0
    # evaluation writes beside the run, never over its metrics (step -1: before training)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [-1, 0, 1]

    missing = run(["eval", *TINY, "--checkpoint", str(tmp_path / "nope")])
    assert missing.returncode != 0 and "not a checkpoint" in missing.stderr
