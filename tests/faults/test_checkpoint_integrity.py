"""Checkpoints on a real run (issue #20, findings 4 and 7).

The disk of the checkpoints fills up during the third save: the run stops with
CheckpointWriteError, nothing is restarted, the two complete checkpoints stay verified and
metrics.jsonl ends with a whole line. Then an attacker replaces the newest checkpoint's
optimizer ``.metadata`` (a pickle) with one whose unpickling creates a file: ``--resume``
rejects that checkpoint, continues from the one before it, and the file is never created.
"""

from __future__ import annotations

import errno
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest

from services.trainer.loop import Trainer
from services.trainer.state import checkpoint_dir, latest_checkpoint, verify_checkpoint
from shuffle_r1.config import load_config
from shuffle_r1.integrity import CheckpointWriteError
from shuffle_r1.models import resolve_model_path
from tests.full_disk import small_tmpfs

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


class Planted:
    """Unpickling it creates ``path``: what an attacker's pickle would do, harmlessly."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def checkpoint_bytes(model_path: Path) -> int:
    """About what one checkpoint of this float32 model takes: the weights three times (model,
    AdamW's two moments) and the tokenizer files."""
    files = [p for p in model_path.iterdir() if p.is_file()]
    weights = sum(p.stat().st_size for p in files if p.suffix == ".safetensors")
    return 3 * weights + sum(p.stat().st_size for p in files if p.suffix != ".safetensors")


def test_a_full_disk_stops_the_run_and_an_altered_checkpoint_is_never_loaded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "run"
    cfg = load_config(
        ROOT / "configs/tiny_cpu.yaml",
        [
            f"trainer.output_dir={out}",
            "trainer.run_name=faults-checkpoint",
            "trainer.total_steps=3",
            "trainer.save_every=1",
            "reward.function=tests.e2e.reward_fns:distinct_char_share",
        ],
    )
    room = int(2.5 * checkpoint_bytes(resolve_model_path(cfg.learner.model_path)))
    # two checkpoints fit (the trainer keeps two), the third does not
    with small_tmpfs(out / "checkpoints", f"{room // 1024}k") as mounted:
        with Trainer(cfg) as trainer:
            first_learner = trainer.learner
            if not mounted:  # no tmpfs: the third save's rank-1 optimizer shard is /dev/full
                save = first_learner.save_checkpoint

                def save_onto_a_full_disk(directory: Any) -> None:
                    if Path(directory).parent.name.startswith("step_000003"):
                        (Path(directory) / "optimizer").mkdir(parents=True)
                        (Path(directory) / "optimizer" / "__1_0.distcp").symlink_to("/dev/full")
                    save(directory)

                first_learner.save_checkpoint = save_onto_a_full_disk  # type: ignore[method-assign]
            with pytest.raises(CheckpointWriteError) as raised:
                trainer.run()
            assert trainer.learner is first_learner  # not rebuilt
            assert "learner/rebuilt" not in trainer.counters
        error = raised.value
        assert error.errno == errno.ENOSPC
        assert str(checkpoint_dir(out, 3)) in str(error) and "--resume" in str(error)
        root = out / "checkpoints"
        assert sorted(p.name for p in root.iterdir()) == ["step_000001", "step_000002"]
        for step in (1, 2):
            verify_checkpoint(checkpoint_dir(out, step), None)
        metrics = (out / "metrics.jsonl").read_bytes()
        assert metrics.endswith(b"\n") and metrics.count(b"\n") == 3  # steps 0, 1, 2

        newest = checkpoint_dir(out, 2)
        marker = tmp_path / "code-ran"
        (newest / "learner" / "optimizer" / ".metadata").write_bytes(pickle.dumps(Planted(marker)))
        with (
            caplog.at_level(logging.ERROR, "services.trainer.state"),
            Trainer(cfg, resume=True) as resumed,
        ):
            assert resumed.state.step == 1 and resumed.learner.version == 1
        assert not marker.exists()
        assert f"checkpoint {newest} does not match its manifest" in caplog.text
        assert "learner/optimizer/.metadata" in caplog.text
        assert latest_checkpoint(out, None) == checkpoint_dir(out, 1)
