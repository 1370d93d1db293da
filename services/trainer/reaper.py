"""Nothing a run starts outlives its driver, even a driver killed with SIGKILL.

A local Ray's GCS, raylet, agents and workers, the engines inside them and an embedded
``redis-server`` are all started (directly or through Ray) by the ``shuffle-r1 train``
process. When that process is killed with SIGKILL, nothing of it runs to stop them: Ray's
dashboard and runtime-env agents were measured still running 30 s after the driver died,
holding ports, memory and the output folder.

:func:`start_reaper` tags the driver's environment with a random mark that every process
it starts inherits (Ray passes its environment down to the raylet and from there to every
worker), then starts a small watcher process in its own session whose standard input is a
pipe from the driver. The kernel closes that pipe when the driver exits, however it
exits; the watcher then sends SIGTERM to every process of this user whose environment
carries the mark, waits ``grace_s`` seconds and sends SIGKILL to those still there, again
and again until none is left (a Ray agent was once measured still running 30 s after a
single such pass: the CI run of issue #20). While the driver runs, the watcher also
records the driver's descendants every ``SCAN_S`` seconds (PID and start time, so a reused
PID is never taken for one), and stops those the same way: a process whose environment
could not be read, or that cleared its environment, is still found.

Linux only (it reads ``/proc/<pid>/environ``); elsewhere :func:`start_reaper` does nothing.
Processes of a Ray cluster that the run joins (``cluster.ray_address`` not ``local``) do not
carry the mark and are never touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

MARK_ENV = "SHUFFLE_R1_RUN_MARK"
SCAN_S = 2.0  # how often the watcher records the driver's descendants
KILL_FOR_S = 20.0  # how long after the grace the watcher keeps killing what it finds


def start_reaper(grace_s: float = 5.0) -> subprocess.Popen[bytes] | None:
    """Mark this process's environment and start the watcher; call it before starting
    any child (Ray, Redis). Returns the watcher (None off Linux). This process ending, or
    :func:`stop_reaper`, makes it stop every marked process."""
    if sys.platform != "linux":
        return None
    mark = secrets.token_hex(16)  # fresh: a mark inherited from another run is not ours
    os.environ[MARK_ENV] = mark
    env = {k: v for k, v in os.environ.items() if k != MARK_ENV}  # never its own target
    return subprocess.Popen(
        [sys.executable, "-m", "services.trainer.reaper", mark, str(grace_s), str(os.getpid())],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        start_new_session=True,  # a kill of the driver's process group spares it
    )


def stop_reaper(watcher: subprocess.Popen[bytes] | None, timeout_s: float = 30.0) -> None:
    """End the run's watch now (the run's children are stopped, or are stopped now) and
    drop the mark from this process's environment, for a caller that goes on running."""
    os.environ.pop(MARK_ENV, None)
    if watcher is None:
        return
    if watcher.stdin is not None:
        watcher.stdin.close()
    try:
        watcher.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        watcher.kill()


def marked(mark: str) -> list[int]:
    """PIDs of this user's processes whose environment has ``MARK_ENV=mark``."""
    needle = f"{MARK_ENV}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or another user's
            continue
    return found


def reap(mark: str, grace_s: float, known: dict[int, str] | None = None) -> list[int]:
    """SIGTERM every marked process and every still-running process of ``known``
    (``{pid: start time}``, :func:`descendants`), then SIGKILL those still there after
    ``grace_s``, repeatedly, until none is left or ``KILL_FOR_S`` more seconds have passed.
    Returns the PIDs that were signalled."""
    known = known or {}

    def targets() -> set[int]:
        found = set(marked(mark))
        found.update(pid for pid, start in known.items() if _start_time(pid) == start)
        return {p for p in found if p > 1 and p != os.getpid() and _alive(p)}  # never itself

    signalled = targets()
    for pid in signalled:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in signalled):
        time.sleep(0.1)
    deadline = time.monotonic() + KILL_FOR_S
    while (left := targets()) and time.monotonic() < deadline:
        for pid in left:
            _signal(pid, signal.SIGKILL)
        signalled |= left
        time.sleep(0.2)
    return sorted(signalled)


def descendants(root: int) -> dict[int, str]:
    """``{pid: start time}`` of every process below ``root`` (children, their children,
    ...), from ``/proc/<pid>/stat``.

    Raises:
        ValueError: ``root`` <= 1 (everything is below init).
    """
    if root <= 1:
        raise ValueError(f"refusing to list the descendants of PID {root}")
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                parent[int(entry.name)] = int(fields[1])
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        start = _start_time(pid)
        if start is not None and pid not in found:
            found[pid] = start
            todo.extend(children.get(pid, []))
    return found


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot, field 22 of ``/proc/<pid>/stat``),
    None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(OSError):  # gone already
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def main(argv: list[str]) -> int:
    mark, grace_s, driver = argv[0], float(argv[1]), int(argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the driver's
    known: dict[int, str] = {}
    stdin = sys.stdin.buffer.fileno()
    while True:
        # the driver's descendants, while it is still this process's parent: once it has
        # died this process belongs to another (init), whose tree is not the run's
        if os.getppid() == driver:
            known.update(descendants(driver))
        ready, _, _ = select.select([stdin], [], [], SCAN_S)
        if ready and not os.read(stdin, 4096):  # b"" once the driver has exited
            break
    reap(mark, grace_s, known)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
