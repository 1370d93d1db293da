"""Stopping ``shuffle-r1 train`` on SIGINT (Ctrl-C) or SIGTERM (a Kubernetes pod's stop).

The first signal abandons the step in progress: :class:`StopOnSignal`'s handler raises
``KeyboardInterrupt`` in the main thread (``ray.get`` and Serve's ``result()`` wait
interruptibly), the trainer closes without waiting for anything
(``Trainer.close(abandon=True)``), and the command exits with ``128 + signal``: 130 for
SIGINT, 143 for SIGTERM. A checkpoint's ``COMPLETE`` marker is written last
(``services.trainer.state``), so the newest complete checkpoint is intact and ``--resume``
continues from it.

Two guards bound the time: ``deadline_s`` after the first signal a watchdog thread kills
every process the run started (the driver's descendants, recorded at the signal: Ray's
raylet, GCS and workers with the engines inside them, an embedded redis-server) and exits,
whatever the cleanup is doing; a second signal does the same at once.

A terminal's Ctrl-C reaches the whole foreground process group. Ray starts its processes
with SIGINT blocked, so they stay up until the driver shuts Ray down; an embedded
redis-server shuts down on SIGINT as on SIGTERM (AOF with ``fsync always``: nothing lost).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any, NoReturn

import psutil

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def descendants() -> list[psutil.Process]:
    """Every living process below this one (children, their children, ...)."""
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _kill(processes: list[psutil.Process], sig: int = signal.SIGKILL) -> None:
    for p in processes:
        try:
            p.send_signal(sig)  # psutil refuses a pid that a new process reuses
        except psutil.Error:
            continue


class StopOnSignal:
    """Handlers for SIGINT and SIGTERM, as a context manager around a command's work.

    The first signal records which one came (:attr:`signum`) and the processes below this
    one, arms the watchdog and raises ``KeyboardInterrupt`` in the main thread; catch it, stop
    what runs without waiting, then ``return stop.finish()``. Leaving the block uninterrupted
    restores the previous handlers; after a signal they stay, so that a second one (or the
    deadline) still exits at once.

    ``ray.init`` installs its own SIGTERM handler (``sys.exit``) and its core worker a C-level
    one: call it inside :meth:`held`, then :meth:`install` again.
    """

    def __init__(self, deadline_s: float = 8.0) -> None:
        self.deadline_s = deadline_s
        self.signum: int | None = None
        self._recorded: list[psutil.Process] = []  # the processes below this one at the signal
        self._previous: dict[int, Any] = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "no signal"

    @property
    def exit_code(self) -> int:
        """``128 + signal``, as a shell reports a process that a signal ended."""
        return 128 + (self.signum or 0)

    def install(self) -> None:
        for sig in SIGNALS:
            previous = signal.signal(sig, self._on_signal)
            self._previous.setdefault(sig, previous)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep these handlers through a call that installs its own: ``ray.init`` puts a
        SIGTERM handler (``sys.exit``) in place, and a signal in that window went to it, whose
        ``SystemExit`` can be swallowed (seen: raised inside logging's at-fork hook, and the
        run went on). Inside the block, ``signal.signal`` leaves SIGINT and SIGTERM alone."""
        original = signal.signal

        def keep(sig: int, handler: Any) -> Any:
            return signal.getsignal(sig) if sig in SIGNALS else original(sig, handler)

        signal.signal = keep  # type: ignore[assignment]
        try:
            yield
        finally:
            signal.signal = original

    def finish(self, grace_s: float = 2.0) -> int:
        """After the cleanup: SIGTERM the processes recorded at the signal that still run, give
        them ``grace_s`` seconds, SIGKILL the rest; returns :attr:`exit_code`."""
        alive = [p for p in self._recorded if p.is_running()]
        _kill(alive, signal.SIGTERM)
        _, alive = psutil.wait_procs(alive, timeout=grace_s)
        _kill(alive)
        psutil.wait_procs(alive, timeout=1.0)
        return self.exit_code

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            self._exit_now(f"second signal ({signal.Signals(signum).name})")
        self.signum = signum
        self._recorded = descendants()
        threading.Thread(target=self._watchdog, name="stop-watchdog", daemon=True).start()
        raise KeyboardInterrupt

    def _watchdog(self) -> None:
        time.sleep(self.deadline_s)
        self._exit_now(f"cleanup still running {self.deadline_s:.0f} s after {self.signal_name}")

    def _exit_now(self, why: str) -> NoReturn:
        """SIGKILL every process this run started and leave, skipping all cleanup."""
        _kill(self._recorded + descendants())
        # straight to fd 2, not through logging or sys.stderr: a signal that interrupted one of
        # them (or logging's at-fork hook) can leave its lock held, and this must not wait
        os.write(2, f"{why}: killed the run's processes; exiting with {self.exit_code}\n".encode())
        os._exit(self.exit_code)

    def __enter__(self) -> StopOnSignal:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.signum is None:
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
