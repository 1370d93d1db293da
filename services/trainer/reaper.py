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
carries the mark, waits ``grace_s`` seconds and sends SIGKILL to those still there.

Linux only (it reads ``/proc/<pid>/environ``); elsewhere :func:`start_reaper` does nothing.
Processes of a Ray cluster that the run joins (``cluster.ray_address`` not ``local``) do not
carry the mark and are never touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

MARK_ENV = "SHUFFLE_R1_RUN_MARK"


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
        [sys.executable, "-m", "services.trainer.reaper", mark, str(grace_s)],
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


def reap(mark: str, grace_s: float) -> list[int]:
    """SIGTERM every marked process, SIGKILL those still there after ``grace_s``; return
    the PIDs that were signalled."""
    pids = marked(mark)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in marked(mark):
        _signal(pid, signal.SIGKILL)
    return pids


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
    mark, grace_s = argv[0], float(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the driver's
    while sys.stdin.buffer.read(4096):  # returns b"" once the driver has exited
        pass
    reap(mark, grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
