"""Checkpoint folders (services/trainer/state.py) on real torch checkpoints: written under a
temporary name with a manifest, checked before anything is deserialised, skipped when damaged
or altered (issue #20, findings 4 and 7), and a full disk reported as the operator's error."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from services.trainer.state import (
    COMPLETE,
    TrainerState,
    checkpoint_dir,
    latest_checkpoint,
    prune_checkpoints,
    read_manifest,
    read_state,
    saving_checkpoint,
    verify_checkpoint,
    write_state,
)
from shuffle_r1.integrity import CheckpointRejectedError, CheckpointWriteError, file_digests
from tests.full_disk import small_tmpfs

KEY = b"the run's buffer token"


class Planted:
    """Unpickling it creates ``path``: what an attacker's pickle would do, harmlessly."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def save(out: Path, step: int, key: bytes | None = KEY) -> Path:
    """A checkpoint as the trainer writes one: a torch.distributed.checkpoint optimizer state
    (its ``.metadata`` is a pickle), ``learner.json`` and the driver's state."""
    with saving_checkpoint(out, step, key) as folder:
        state = {"exp_avg": torch.full((64,), float(step)), "step": torch.tensor(step)}
        dcp.save({"optimizer": state}, checkpoint_id=str(folder / "learner" / "optimizer"))
        (folder / "learner" / "learner.json").write_text(json.dumps({"version": step}))
        write_state(folder, TrainerState(step=step, counters={"data/skipped_rows": step}))
    return checkpoint_dir(out, step)


def load_optimizer(folder: Path) -> torch.Tensor:
    state = {"optimizer": {"exp_avg": torch.zeros(64), "step": torch.tensor(0)}}
    dcp.load(state, checkpoint_id=str(folder / "learner" / "optimizer"))
    return state["optimizer"]["exp_avg"]


def test_a_checkpoint_is_renamed_into_place_with_a_signed_manifest(tmp_path: Path) -> None:
    folder = save(tmp_path, 3)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000003"]
    manifest = json.loads((folder / COMPLETE).read_text())
    assert manifest["step"] == 3 and len(manifest["hmac"]) == 64
    assert set(manifest["files"]) == {
        "learner/learner.json",
        "learner/optimizer/.metadata",
        "learner/optimizer/__0_0.distcp",
        "rng.pt",
        "trainer_state.json",
    }
    assert verify_checkpoint(folder, KEY) == manifest["files"]
    assert read_state(folder, KEY).counters == {"data/skipped_rows": 3}
    assert latest_checkpoint(tmp_path, KEY) == folder
    assert float(load_optimizer(folder)[0]) == 3.0


def test_an_altered_pickle_is_never_loaded_and_the_previous_checkpoint_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding 4: ``.metadata`` of the newest checkpoint replaced by a planted pickle."""
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    marker = tmp_path / "code-ran"
    metadata = newest / "learner" / "optimizer" / ".metadata"
    metadata.write_bytes(pickle.dumps(Planted(marker)))

    with caplog.at_level(logging.ERROR, "services.trainer.state"):
        chosen = latest_checkpoint(tmp_path, KEY)
    assert chosen == checkpoint_dir(tmp_path, 1)
    assert float(load_optimizer(chosen)[0]) == 1.0
    assert not marker.exists()
    assert "learner/optimizer/.metadata" in caplog.text and str(newest) in caplog.text
    # The planted file is live: the loader itself would have run it.
    with pytest.raises(CheckpointException, match="TextIOWrapper"):  # open()'s, unpickled
        load_optimizer(newest)
    assert marker.exists()


@pytest.mark.parametrize(
    "damage",
    ["truncated", "changed byte", "extra file", "missing file", "no manifest", "moved step"],
)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, damage: str
) -> None:
    """Finding 7, part 2: --resume takes the previous complete checkpoint instead of failing;
    with a key and without one (damage needs no key to be seen)."""
    save(tmp_path, 1, key=None)
    newest = save(tmp_path, 2, key=None)
    shard = newest / "learner" / "optimizer" / "__0_0.distcp"
    if damage == "truncated":
        os.truncate(shard, shard.stat().st_size // 2)
    elif damage == "changed byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 1
        shard.write_bytes(bytes(data))
    elif damage == "extra file":
        (newest / "learner" / "model.bin").write_bytes(b"unlisted")
    elif damage == "missing file":
        (newest / "rng.pt").unlink()
    elif damage == "no manifest":
        (newest / COMPLETE).unlink()
    else:  # a genuine manifest of step 1 copied over step 2's
        shutil.copy(checkpoint_dir(tmp_path, 1) / COMPLETE, newest / COMPLETE)
    assert latest_checkpoint(tmp_path, None) == checkpoint_dir(tmp_path, 1)
    with pytest.raises(CheckpointRejectedError):
        verify_checkpoint(newest, None)
    if damage in ("truncated", "changed byte", "extra file", "missing file"):
        with pytest.raises(CheckpointRejectedError, match=str(newest)):
            verify_checkpoint(newest, None)


def test_with_a_key_a_manifest_rewritten_without_it_is_rejected(tmp_path: Path) -> None:
    """Finding 4: a forger rewrites a file and the digests; only the key tells."""
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    (newest / "trainer_state.json").write_text(json.dumps({"step": 99}))
    manifest = json.loads((newest / COMPLETE).read_text())
    manifest["files"] = file_digests(newest)
    del manifest["files"][COMPLETE]
    for hmac in (None, "0" * 64):  # unsigned, or signed with another key
        manifest["hmac"] = hmac
        (newest / COMPLETE).write_text(json.dumps(manifest))
        with pytest.raises(CheckpointRejectedError, match=r"not signed|HMAC"):
            read_manifest(newest, KEY)
        assert latest_checkpoint(tmp_path, KEY) == checkpoint_dir(tmp_path, 1)
        with pytest.raises(CheckpointRejectedError):
            read_state(newest, KEY)
    # Without a key the forged list passes: a digest list catches damage, not a forger.
    assert latest_checkpoint(tmp_path, None) == newest


def test_a_full_disk_during_a_save_is_an_operator_error(tmp_path: Path) -> None:
    """Finding 7: ENOSPC while writing names the folder, the errno and the free space;
    the partial folder goes, the previous checkpoint stays whole."""
    out = tmp_path / "run"
    with small_tmpfs(out / "checkpoints", "2m") as mounted:
        first = save(out, 1)
        with (
            pytest.raises(CheckpointWriteError) as raised,
            saving_checkpoint(out, 2, KEY) as folder,
        ):
            big = folder / "learner" / "model.safetensors"
            big.parent.mkdir(parents=True)
            if not mounted:  # the same kernel error from a file that is /dev/full
                big.symlink_to("/dev/full")
            with big.open("wb") as f:
                for _ in range(64):
                    f.write(os.urandom(1 << 16))  # 4 MiB into a 2 MiB tmpfs
        error = raised.value
        assert error.errno == errno.ENOSPC
        message = str(error)
        assert "[ENOSPC]" in message and str(checkpoint_dir(out, 2)) in message
        assert "free on that filesystem" in message and str(first) in message
        assert "--resume" in message
        assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == ["step_000001"]
        assert verify_checkpoint(first, KEY)
        assert latest_checkpoint(out, KEY) == first


def test_prune_keeps_the_saved_checkpoint_and_those_before_it(tmp_path: Path) -> None:
    """After a resume from step 1 skipped a rejected step 4, saving step 3 drops step 4 (and
    what crashed saves left), never the good ones before it."""
    for step in (1, 2, 4):
        save(tmp_path, step)
    root = tmp_path / "checkpoints"
    (root / "step_000005.tmp-1").mkdir()
    (root / "step_000002.old-1").mkdir()
    third = save(tmp_path, 3)
    prune_checkpoints(tmp_path, 2, third)
    assert sorted(p.name for p in root.iterdir()) == ["step_000002", "step_000003"]
    save(tmp_path, 3)  # saved again: replaced whole
    assert verify_checkpoint(third, KEY)


def test_an_older_checkpoint_with_retired_state_fields_still_loads(tmp_path: Path) -> None:
    # trainer_state.json as checkpoints before issue #18 wrote it
    with saving_checkpoint(tmp_path, 2, KEY) as folder:
        write_state(folder, TrainerState(step=2))
        old = {"step": 2, "weight_version": 2, "sampler": {}, "buffer_cursor": 1, "counters": {}}
        (folder / "trainer_state.json").write_text(json.dumps(old))
    state = read_state(checkpoint_dir(tmp_path, 2), KEY)
    assert state == TrainerState(step=2)
