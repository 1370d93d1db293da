"""A real full disk for tests: a small tmpfs mounted on a folder.

Mounting needs root (CI runs as root, as does the development container). Where it is not
allowed, :func:`small_tmpfs` yields False and each test makes the same kernel error another
real way (a file that is a link to ``/dev/full``, whose every write fails with ``ENOSPC``).
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[bool]:
    """Mount a tmpfs of ``size`` (``mount -o size=``, e.g. ``2m``) on ``folder`` (created)
    for the block; yields whether it is mounted."""
    folder.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)]
    mounted = subprocess.run(mount, capture_output=True, check=False).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "--lazy", str(folder)], check=True)


def fill(folder: Path, leave: int) -> Path:
    """Fill ``folder``'s filesystem with one file, leaving ``leave`` bytes free; its path."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while os.write(fd, b"\0" * (1 << 16)):
            pass
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler
