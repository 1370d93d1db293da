"""Checkpoints of the driver's own state, beside the learner's model and optimizer.

A checkpoint folder ``<output_dir>/checkpoints/step_<N>/`` holds:

- ``learner/``: the model in HF format and the optimizer state (``actors.learner``);
- ``trainer_state.json``: step, weight version, data sampler position, buffer cursor;
- ``rng.pt``: the driver's torch / python RNG states (tensors only, loaded with
  ``weights_only=True``: nothing is unpickled);
- ``COMPLETE``: written last, so a folder without it (a crash mid-save) is ignored.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE"


@dataclass
class TrainerState:
    """What the driver needs to continue a run exactly where a checkpoint left it."""

    step: int = 0  # training steps completed
    weight_version: int = 0  # version of the policy the rollout workers hold
    sampler: dict[str, Any] = field(default_factory=dict)
    buffer_cursor: int = -1  # last step sampled from the replay buffer
    counters: dict[str, float] = field(default_factory=dict)  # cumulative, e.g. skipped rows


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:06d}"


def write_state(folder: Path, state: TrainerState) -> None:
    """Write the driver's part of a checkpoint and mark the folder complete."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "trainer_state.json").write_text(json.dumps(asdict(state), indent=1))
    py_state = random.getstate()
    torch.save(
        {
            "torch": torch.get_rng_state(),
            "python_version": torch.tensor([py_state[0]]),
            "python_state": torch.tensor(py_state[1], dtype=torch.int64),
        },
        folder / "rng.pt",
    )
    (folder / COMPLETE).write_text("ok\n")


def read_state(folder: Path) -> TrainerState:
    """Read a checkpoint written by :func:`write_state`, restoring the driver's RNGs."""
    if not (folder / COMPLETE).exists():
        raise FileNotFoundError(f"checkpoint {folder} is incomplete (no {COMPLETE} marker)")
    raw = json.loads((folder / "trainer_state.json").read_text())
    rng = torch.load(folder / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(
        (int(rng["python_version"][0]), tuple(int(x) for x in rng["python_state"]), None)
    )
    return TrainerState(**raw)


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint folder under ``output_dir``, or None."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted(p for p in root.glob("step_*") if (p / COMPLETE).exists())
    return done[-1] if done else None


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (and any incomplete ones)."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return
    folders = sorted(root.glob("step_*"))
    complete = [p for p in folders if (p / COMPLETE).exists()]
    stale = [p for p in folders if p not in complete[-keep:]]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
