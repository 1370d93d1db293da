"""Child processes that cannot outlive their parent (Linux's parent-death signal)."""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """In a child (before exec, or first thing in a spawned process): have Linux send ``sig``
    to it when its parent dies, even by SIGKILL (``prctl(PR_SET_PDEATHSIG)``), and exit at
    once if the parent ``parent_pid`` is already gone (it died before the call took effect).

    The signal follows the *thread* that started the child, not the process: start such
    children from a thread that lives as long as its owner (a main thread, or one long-lived
    starter thread). Linux only; elsewhere a no-op.
    """
    if sys.platform != "linux":
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, sig, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    if os.getppid() != parent_pid:
        os._exit(1)
