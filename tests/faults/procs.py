"""Find the real processes of this test session's Ray roles, to kill them with SIGKILL.

Ray titles an actor's process ``ray::<ClassName>`` (a Serve replica
``ray::ServeReplica:<app>:<deployment>``); only descendants of this test process count, so
other Ray clusters on the machine are never touched.
"""

from __future__ import annotations

import os
import signal
import time

import psutil


def ray_actor_pids(title: str) -> list[int]:
    """PIDs of this session's Ray worker processes whose title starts with ``ray::<title>``."""
    pids = []
    for child in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if child.cmdline() and child.cmdline()[0].startswith(f"ray::{title}"):
                pids.append(child.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def gone(pid: int, timeout_s: float = 10.0) -> bool:
    """``pid`` has ended (or is a zombie) within ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


def kill9(pid: int, timeout_s: float = 10.0) -> None:
    """SIGKILL ``pid`` and wait until it is gone (``TimeoutError`` if it lingers)."""
    os.kill(pid, signal.SIGKILL)
    if not gone(pid, timeout_s):
        raise TimeoutError(f"process {pid} still runs {timeout_s} s after SIGKILL")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used (0.0 once it is gone)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return float(times.user + times.system)


def working(pid: int, window_s: float = 0.15, share: float = 0.4) -> bool:
    """``pid`` is computing now: it used more than ``share`` of a core over the next
    ``window_s`` seconds (a Serve replica's background chores use far less)."""
    before = cpu_seconds(pid)
    time.sleep(window_s)
    return cpu_seconds(pid) - before > share * window_s
