"""Checkpoints of a run: the driver's own state beside the learner's model and optimizer,
written so that a reader never sees half of one, and checked before anything in one is
deserialised.

A checkpoint folder ``<output_dir>/checkpoints/step_<N>/`` holds:

- ``learner/``: the model in HF format and the optimizer state (``actors.learner``);
- ``trainer_state.json``: step, data sampler position, counters (the weight version is the
  learner's, in ``learner/learner.json``);
- ``rng.pt``: the driver's torch / python RNG states (tensors only, loaded with
  ``weights_only=True``);
- ``MANIFEST.json`` (:data:`COMPLETE`): the SHA-256 digest and size of every other file.

Writing (:func:`saving_checkpoint`): everything goes to ``step_<N>.tmp-<pid>/``, the
manifest last (after every file was flushed to disk), then the folder is renamed to
``step_<N>``: a checkpoint folder is complete or absent. A save that fails removes its
temporary folder; one that fails for lack of space, quota or permission raises
:class:`~shuffle_r1.integrity.CheckpointWriteError` (an operator error, not a learner failure).

Reading (:func:`verify_checkpoint`, :func:`latest_checkpoint`, :func:`read_state`): the
loaders of a checkpoint unpickle (``torch.distributed.checkpoint``'s ``.metadata``,
DeepSpeed's ``torch.load``), so every file is checked against the manifest before anything
reads it. A missing, extra, resized or changed file rejects the checkpoint with a log line
naming it, and :func:`latest_checkpoint` falls back to the newest one that passes.

The manifest's key (:func:`run_key`: the run's buffer token, when one is set): the manifest
then carries an HMAC-SHA256 of its content, and one without it or with another is rejected,
so whoever can write the output folder but does not know the token cannot make the run load
their files. Without a key the manifest is a plain digest list: it catches damage (a
truncated or torn file) but not a forger, who can rewrite the digests too. Either way the
check narrows, but cannot close, the time between the check and the load: keep the output
folder writable only by the run's user.
"""

from __future__ import annotations

import errno
import hashlib
import hmac
import io
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from shuffle_r1.config import BUFFER_TOKEN_ENV
from shuffle_r1.integrity import (
    OPERATOR_ERRNOS,
    CheckpointRejectedError,
    CheckpointWriteError,
    check_files,
    file_digests,
)

logger = logging.getLogger(__name__)

COMPLETE = "MANIFEST.json"  # written last: a folder holds it only when complete
MANIFEST_FORMAT = "shuffle-r1 checkpoint manifest 1"
TOKEN_ENV = BUFFER_TOKEN_ENV  # the buffer's token signs the manifests too
_NAME = re.compile(r"step_(\d+)")


@dataclass
class TrainerState:
    """What the driver needs to continue a run exactly where a checkpoint left it."""

    step: int = 0  # training steps completed
    sampler: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)  # cumulative, e.g. skipped rows

    # fields of older checkpoints' trainer_state.json that nothing read (the weight version
    # is the learner's own, in its checkpoint); skipped when such a checkpoint is loaded
    RETIRED = ("weight_version", "buffer_cursor")


def run_key(token: str) -> bytes | None:
    """The key that signs a run's manifests: ``token`` (``buffer.auth_token``), else
    ``$SHUFFLE_R1_BUFFER_TOKEN``, as UTF-8; None when neither is set."""
    token = token or os.environ.get(TOKEN_ENV, "")
    return token.encode() if token else None


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:06d}"


@contextmanager
def saving_checkpoint(output_dir: Path, step: int, key: bytes | None) -> Iterator[Path]:
    """Yield the temporary folder to write step ``step``'s checkpoint into; on a clean exit
    write its manifest (signed with ``key``) and rename it to :func:`checkpoint_dir`,
    replacing a folder of that name (one a resume skipped, or an earlier run's).

    Raises:
        CheckpointWriteError: a write failed with an errno of ``OPERATOR_ERRNOS`` (disk full,
            quota, read-only, permission), here or in the block (where it may come as that
            error already, from the learner ranks). The temporary folder is removed either way.
    """
    final = checkpoint_dir(output_dir, step)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)  # a stale one of a crashed process with this pid
        tmp.mkdir(parents=True)
        yield tmp
        _write_manifest(tmp, step, key)
        if final.exists():
            old = final.with_name(f"{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, CheckpointWriteError) or not (
            isinstance(exc, OSError) and exc.errno in OPERATOR_ERRNOS
        ):
            raise
        last = latest_checkpoint(output_dir, verify=False)
        raise CheckpointWriteError.wrap(
            exc,
            f"checkpoint {final}",
            final.parent,
            f"The partial checkpoint was removed; the last complete one ({last or 'none'}) is "
            "intact. Free space (or raise the quota, or make the folder writable), then "
            "continue with `shuffle-r1 train --resume`.",
        ) from exc


def write_state(folder: Path, state: TrainerState) -> None:
    """Write the driver's part of a checkpoint into ``folder``."""
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


def read_state(folder: Path, key: bytes | None = None) -> TrainerState:
    """Read a checkpoint's driver state, restoring the driver's RNGs. Each file is read once
    and checked against the manifest (:func:`read_manifest`) before it is parsed.

    Raises:
        CheckpointRejectedError: no valid manifest, or a file does not match it.
    """
    files = read_manifest(folder, key)
    raw = json.loads(_verified_bytes(folder, "trainer_state.json", files))
    rng = torch.load(io.BytesIO(_verified_bytes(folder, "rng.pt", files)), weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate(
        (int(rng["python_version"][0]), tuple(int(x) for x in rng["python_state"]), None)
    )
    return TrainerState(**{k: v for k, v in raw.items() if k not in TrainerState.RETIRED})


def read_manifest(folder: Path, key: bytes | None) -> dict[str, dict[str, Any]]:
    """The ``files`` of ``folder``'s manifest (``{relative path: {"sha256", "bytes"}}``),
    authenticated with ``key`` when one is given; nothing else of the folder is read.

    Raises:
        CheckpointRejectedError: no manifest, a malformed one, one written for another step,
            or (with ``key``) one that is unsigned or whose HMAC does not match.
    """
    path = folder / COMPLETE
    try:
        manifest = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise CheckpointRejectedError(f"{path}: no readable manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointRejectedError(f"{path}: not a {MANIFEST_FORMAT!r}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
        for v in files.values()
    ):
        raise CheckpointRejectedError(f"{path}: 'files' is not a map of sha256 and bytes")
    if manifest.get("step") != _step(folder):
        raise CheckpointRejectedError(
            f"{path}: written for step {manifest.get('step')!r}, found in {folder.name}"
        )
    if key is not None:
        signature = manifest.get("hmac")
        if not isinstance(signature, str):
            raise CheckpointRejectedError(
                f"{path} is not signed, but this run has a key (buffer.auth_token / "
                f"${TOKEN_ENV}): it was written without the key, or forged"
            )
        if not hmac.compare_digest(signature, _sign(manifest, key)):
            raise CheckpointRejectedError(
                f"{path}: the HMAC does not match this run's key: the manifest was changed, "
                "or written with another token"
            )
    return files


def verify_checkpoint(folder: Path, key: bytes | None) -> dict[str, dict[str, Any]]:
    """Check every file of the checkpoint ``folder`` against its manifest (authenticated with
    ``key``); return the manifest's files. Reads the files as bytes only.

    Raises:
        CheckpointRejectedError: what did not match, and where.
    """
    files = read_manifest(folder, key)
    problems = check_files(folder, {**files, COMPLETE: _listed_size(folder)})
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointRejectedError(
            f"checkpoint {folder} does not match its manifest: {'; '.join(problems[:5])}{more}"
        )
    return files


def files_under(files: Mapping[str, Mapping[str, Any]], prefix: str) -> dict[str, Any]:
    """The entries of a manifest's ``files`` under the subfolder ``prefix``, relative to it."""
    head = prefix.rstrip("/") + "/"
    return {name[len(head) :]: dict(v) for name, v in files.items() if name.startswith(head)}


def latest_checkpoint(
    output_dir: Path, key: bytes | None = None, verify: bool = True
) -> Path | None:
    """The newest complete checkpoint folder under ``output_dir`` that passes
    :func:`verify_checkpoint` with ``key``, or None. A checkpoint that fails is logged (as an
    error, with what did not match) and the one before it tried.

    ``verify=False`` skips reading the files: the newest folder with a manifest, for
    messages — never for loading.
    """
    for folder in reversed(_complete(output_dir)):
        if not verify:
            return folder
        try:
            verify_checkpoint(folder, key)
        except CheckpointRejectedError as exc:
            logger.error("checkpoint rejected, trying the one before it: %s", exc)
            continue
        return folder
    return None


def prune_checkpoints(output_dir: Path, keep: int, current: Path) -> None:
    """Keep ``current`` (the checkpoint just written) and the ``keep - 1`` complete ones
    before it; delete the older ones, those of later steps (a line of steps the run left when
    it resumed or rebuilt from an earlier checkpoint, or an earlier run's) and what crashed
    saves left (``step_<N>.tmp-<pid>``, ``step_<N>.old-<pid>``)."""
    root = output_dir / "checkpoints"
    kept = [p for p in _complete(output_dir) if _step(p) <= _step(current)][-keep:]
    for path in root.glob("step_*"):
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def _complete(output_dir: Path) -> list[Path]:
    """The ``step_<N>`` folders that hold a manifest, oldest first."""
    root = output_dir / "checkpoints"
    if not root.is_dir():
        return []
    named = [p for p in root.iterdir() if _NAME.fullmatch(p.name)]
    return sorted((p for p in named if (p / COMPLETE).is_file()), key=_step)


def _step(folder: Path) -> int:
    match = _NAME.fullmatch(folder.name)
    return int(match.group(1)) if match else -1


def _write_manifest(folder: Path, step: int, key: bytes | None) -> None:
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "files": file_digests(folder, sync=True),
    }
    manifest["hmac"] = _sign(manifest, key) if key is not None else None
    path = folder / COMPLETE
    with path.open("w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _sign(manifest: Mapping[str, Any], key: bytes) -> str:
    """HMAC-SHA256 of the manifest's canonical JSON without its ``hmac``."""
    body = {k: v for k, v in manifest.items() if k != "hmac"}
    payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def _listed_size(folder: Path) -> dict[str, Any]:
    """The manifest's own entry for :func:`check_files` (it is not in its own list)."""
    path = folder / COMPLETE
    data = path.read_bytes()
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _verified_bytes(folder: Path, name: str, files: Mapping[str, Mapping[str, Any]]) -> bytes:
    if name not in files:
        raise CheckpointRejectedError(f"{folder / name} is not in the checkpoint's manifest")
    data = (folder / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != files[name]["sha256"]:
        raise CheckpointRejectedError(f"{folder / name}: SHA-256 differs from the manifest's")
    return data


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot sync a folder; the rename still holds
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)
