"""One run per output folder (issue #20, finding 5): a second process is refused with a
message that names the holder; a lock left by a killed process never blocks the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.trainer.runlock import LOCK_NAME, RunLock, RunLockedError

ROOT = Path(__file__).resolve().parents[2]
HOLD = (
    "import sys, time\n"
    "from services.trainer.runlock import RunLock\n"
    "RunLock(sys.argv[1]).acquire()\n"
    "print('held', flush=True)\n"
    "time.sleep(60)\n"
)


def _holder(folder: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_second_process_is_refused_and_named(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    try:
        with pytest.raises(RunLockedError) as info:
            RunLock(tmp_path).acquire()
        assert f"pid {holder.pid}" in str(info.value)
        assert "trainer.output_dir" in str(info.value)
    finally:
        holder.kill()
        holder.wait()


def test_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; the kernel dropped the lock
    with RunLock(tmp_path) as lock:
        assert f'"pid": {os.getpid()}' in lock.path.read_text()


def test_reentrant_within_a_process(tmp_path: Path) -> None:
    outer = RunLock(tmp_path).acquire()
    inner = RunLock(tmp_path).acquire()  # the CLI holds it, then the trainer takes it again
    inner.release()
    probe = subprocess.run(
        [sys.executable, "-c", HOLD.replace("time.sleep(60)", ""), str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert probe.returncode != 0 and "RunLockedError" in probe.stderr  # still held by outer
    outer.release()
    probe = subprocess.run(
        [sys.executable, "-c", HOLD.replace("time.sleep(60)", ""), str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
