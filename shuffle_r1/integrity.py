"""Integrity of what a run writes: the SHA-256 digests of a checkpoint's files, checked
before any loader reads them, and the errors of a write that failed for the operator's reasons.

Checkpoint loaders unpickle: ``torch.distributed.checkpoint`` reads its ``.metadata`` with
``pickle.load`` and non-tensor items with ``torch.load(weights_only=False)``; DeepSpeed's
``load_checkpoint`` calls ``torch.load`` without ``weights_only``. So a checkpoint's files
reach a loader only after they matched the digests of its manifest
(``services.trainer.state`` writes and authenticates the manifest; the learner ranks check
the files again with :func:`check_files` right before they load).

A write that fails with an errno of :data:`OPERATOR_ERRNOS` (a full disk, a quota, a file
size limit, a read-only or forbidden folder) is the operator's to fix: restarting the process
that wrote would fail the same way. :class:`OutputWriteError` says so, with the folder, the
errno and the free space; :func:`operator_os_error` finds such an error wherever a library or
Ray wrapped it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# A full disk, a quota, RLIMIT_FSIZE, a read-only filesystem, no permission.
OPERATOR_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
)
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_CHUNK = 1 << 20
_HASH_THREADS = min(8, os.cpu_count() or 1)  # hashlib releases the GIL on large buffers


class OutputWriteError(OSError):
    """Writing the run's output failed for a reason the operator must fix (an errno of
    :data:`OPERATOR_ERRNOS`). ``errno`` is the failed write's, ``filename`` the file or
    folder being written, ``str()`` the whole message (what, where, the free space, what to do).
    """

    def __init__(self, code: int, message: str, filename: str) -> None:
        super().__init__(code, message, filename)

    def __str__(self) -> str:
        return str(self.strerror)

    @classmethod
    def wrap(cls, exc: OSError, what: str, where: Path, advice: str) -> OutputWriteError:
        """The error for ``exc`` (an operator errno) raised while writing ``what`` to
        ``where``; the message adds the free space of ``where``'s filesystem and ``advice``."""
        code = exc.errno or errno.EIO
        name = errno.errorcode.get(code, str(code))
        message = (
            f"{what}: {os.strerror(code)} [{name}] writing {exc.filename or where} "
            f"({_free_space(where)} free on that filesystem). {advice}"
        )
        return cls(code, message, str(where))


class CheckpointWriteError(OutputWriteError):
    """A checkpoint could not be written (an errno of :data:`OPERATOR_ERRNOS`). Not a learner
    failure: the run stops and nothing is restarted; its partial folder has been removed, the
    previous complete checkpoint is intact."""


class CheckpointRejectedError(ValueError):
    """A checkpoint's files do not match its manifest (missing, extra, different size or
    digest, unsigned or wrongly signed); nothing of it was deserialised."""


def operator_os_error(exc: BaseException) -> OSError | None:
    """The first ``OSError`` with an errno of :data:`OPERATOR_ERRNOS` in ``exc``, its causes
    and contexts, a Ray task error's ``cause`` and a ``torch.distributed.checkpoint``
    ``CheckpointException``'s per-rank ``failures``; None if there is none.

    Libraries written in Rust (safetensors: ``SafetensorError``) report an I/O error only as
    text, ``... (os error 28)``; such an error counts as the ``OSError`` it names.
    """
    pending: list[Any] = [exc]
    seen: set[int] = set()
    while pending:
        node = pending.pop(0)
        if not isinstance(node, BaseException) or id(node) in seen:
            continue
        seen.add(id(node))
        cause = getattr(node, "cause", None)  # ray.exceptions.RayTaskError: the task's own
        if isinstance(cause, BaseException):
            pending.insert(0, cause)
            continue
        if isinstance(node, OSError) and node.errno in OPERATOR_ERRNOS:
            return node
        rust = _RUST_OS_ERROR.search(str(node))
        if not isinstance(node, OSError) and rust and int(rust.group(1)) in OPERATOR_ERRNOS:
            code = int(rust.group(1))
            return OSError(code, os.strerror(code))
        failures = getattr(node, "failures", None)  # CheckpointException: {rank: (exc, tb)}
        if isinstance(failures, Mapping):
            pending.extend(f[0] if isinstance(f, tuple) else f for f in failures.values())
        pending.extend((node.__cause__, node.__context__))
    return None


def list_files(root: Path) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``root`` (paths with ``/``).

    Raises:
        CheckpointRejectedError: ``root`` holds a symbolic link or anything else that is not
            a regular file or folder (a loader would follow it out of the checkpoint).
    """
    files: dict[str, int] = {}
    for folder, dirs, names in os.walk(root):
        for name in [*dirs, *names]:
            path = Path(folder, name)
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise CheckpointRejectedError(f"{path} is not a regular file")
            files[path.relative_to(root).as_posix()] = path.lstat().st_size
    return files


def file_digests(root: Path, sync: bool = False) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256": hex, "bytes": size}}`` of every file under ``root``
    (:func:`list_files`); ``sync=True`` also flushes each file to stable storage (before a
    rename makes a checkpoint visible)."""
    names = sorted(list_files(root))
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = pool.map(lambda name: _sha256(root / name, sync), names)
        return {
            name: {"sha256": digest, "bytes": size}
            for name, (digest, size) in zip(names, digests, strict=True)
        }


def check_files(
    root: Path, expected: Mapping[str, Mapping[str, Any]], share: tuple[int, int] = (0, 1)
) -> list[str]:
    """What differs between the files under ``root`` and ``expected`` (as
    :func:`file_digests` gives them); empty when they match.

    Every file's presence and size is checked; the SHA-256 of the files in ``share``
    ``(i, n)`` only: every ``n``-th file in name order from the ``i``-th, so ``n`` processes
    that see the same folder split the reading between them. Reads nothing but bytes.
    """
    try:
        found = list_files(root)
    except (CheckpointRejectedError, OSError) as exc:
        return [str(exc)]
    problems = [f"{name}: missing" for name in sorted(set(expected) - set(found))]
    problems += [f"{name}: not in the manifest" for name in sorted(set(found) - set(expected))]
    problems += [
        f"{name}: {found[name]} bytes, the manifest says {expected[name]['bytes']}"
        for name in sorted(set(found) & set(expected))
        if found[name] != expected[name]["bytes"]
    ]
    if problems:
        return problems
    index, count = share
    mine = sorted(expected)[index::count]
    with ThreadPoolExecutor(_HASH_THREADS) as pool:
        digests = list(pool.map(lambda name: _sha256(root / name)[0], mine))
    return [
        f"{name}: SHA-256 differs from the manifest's"
        for name, digest in zip(mine, digests, strict=True)
        if digest != expected[name]["sha256"]
    ]


def _sha256(path: Path, sync: bool = False) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())
    return digest.hexdigest(), size


# Below this many free bytes a failed write counts as a full disk whatever error it raised.
FULL_DISK_BYTES = 1 << 20


def full_disk_error(exc: BaseException, where: Path) -> OSError | None:
    """:func:`operator_os_error` of ``exc``, or, when ``exc`` names no errno but the file
    system of ``where`` has less than :data:`FULL_DISK_BYTES` free, an ``ENOSPC`` error.

    Some writers lose the errno of a short write: torch's zip writer (``torch.save``, used by
    ``torch.distributed.checkpoint`` and DeepSpeed) raises ``RuntimeError: [enforce fail at
    inline_container.cc] unexpected pos ...`` on a full disk (measured). The free space after
    the failure is what tells such a failure from a bug.
    """
    error = operator_os_error(exc)
    if error is not None:
        return error
    for folder in (where, *where.parents):
        if folder.exists():
            if shutil.disk_usage(folder).free < FULL_DISK_BYTES:
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where))
            return None
    return None


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.exists():
            free = shutil.disk_usage(folder).free
            return f"{free / 2**20:.1f} MiB" if free >= 2**20 else f"{free} bytes"
    return "unknown space"
