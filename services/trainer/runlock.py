"""One run per output folder: an OS file lock held for the run's life.

Two runs writing one ``trainer.output_dir`` at once corrupt each other: two embedded Redis
servers on one append-only file, interleaved ``metrics.jsonl`` rows, each overwriting the
other's checkpoints. :class:`RunLock` takes an exclusive ``flock(2)`` on
``<output_dir>/.lock`` and writes who holds it (pid, host, command, start time) into the
file, so a second run is refused with a message that names the first. The kernel releases
the lock when the holder exits for any reason (SIGKILL included): a lock left behind by a
dead run never blocks the next one.

``flock`` is per machine: on a network file system shared by several hosts it may not
exclude a run on another host (NFS emulates it with POSIX locks, most other shared file
systems do not support it at all). Give each run its own folder there.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

LOCK_NAME = ".lock"

_held: dict[Path, tuple[int, int]] = {}  # folder -> (fd, holders in this process)


class RunLockedError(RuntimeError):
    """Another process holds the output folder's lock; the message names it."""


class RunLock:
    """The exclusive lock of ``output_dir`` (created if missing).

    Re-entrant within one process (the CLI takes it before starting Ray, the trainer again
    when it is built): the lock is released when the last holder here releases it.
    Use as a context manager or call :meth:`acquire` / :meth:`release`.

    Raises:
        RunLockedError: from :meth:`acquire` when another process holds it.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.folder = Path(output_dir).resolve()
        self.path = self.folder / LOCK_NAME
        self._mine = False

    def acquire(self) -> RunLock:
        if self._mine:
            return self
        held = _held.get(self.folder)
        if held is not None:
            _held[self.folder] = (held[0], held[1] + 1)
            self._mine = True
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                raise
            raise RunLockedError(
                f"{self.folder} is in use by another run ({_describe(self.path)}); two runs "
                "in one folder would overwrite each other's checkpoints, metrics and Redis "
                "data. Stop that run, or give this one another trainer.output_dir"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join(sys.argv)[:500],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        _held[self.folder] = (fd, 1)
        self._mine = True
        return self

    def release(self) -> None:
        if not self._mine:
            return
        self._mine = False
        fd, count = _held[self.folder]
        if count > 1:
            _held[self.folder] = (fd, count - 1)
            return
        del _held[self.folder]
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(path: Path) -> str:
    """Who holds the lock at ``path``, in words, from what it wrote there."""
    try:
        holder: dict[str, Any] = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "its holder did not say who it is"
    return (
        f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}: "
        f"{holder.get('command', '?')}"
    )
