"""Nothing a run starts outlives its driver (issue #20, finding 6): an embedded Redis and
every process below the driver — also one that left the driver's process tree, as Ray's
agents do — are stopped when the driver is killed with SIGKILL."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]


def _run_driver(code: str) -> tuple[subprocess.Popen[str], list[int]]:
    """Start ``code`` (which prints the PIDs to watch on one line) and read them."""
    driver = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    assert driver.stdout is not None
    pids = [int(p) for p in driver.stdout.readline().split()]
    assert pids, "the driver printed no PIDs"
    return driver, pids


def _gone_within(pids: list[int], timeout_s: float) -> list[int]:
    """The PIDs still running (not zombies) after up to ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def test_embedded_redis_stops_with_its_killed_parent() -> None:
    driver, (redis_pid,) = _run_driver(
        "import time\n"
        "from services.embedded_redis import EmbeddedRedis\n"
        "r = EmbeddedRedis().start()\n"
        "print(r.process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    alive = _gone_within([redis_pid], 10)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "redis-server outlived the process that started it"


def test_reaper_stops_every_process_the_run_started() -> None:
    # a child, and a daemon that left the driver's session and process tree (setsid + its
    # parent exiting: reparented), as Ray's agents end up when the driver dies
    driver, pids = _run_driver(
        "import subprocess, time\n"
        "from services.trainer.reaper import start_reaper\n"
        "start_reaper(grace_s=2)\n"
        "child = subprocess.Popen(['sleep', '120'])\n"
        "daemon = subprocess.run(['sh', '-c', 'setsid sleep 120 >/dev/null 2>&1 & echo $!'],\n"
        "                        capture_output=True, text=True).stdout.split()[0]\n"
        "print(child.pid, daemon, flush=True)\n"
        "time.sleep(120)\n"
    )
    try:
        assert psutil.Process(pids[1]).ppid() != driver.pid  # outside the driver's tree
        bystander = subprocess.Popen(["sleep", "120"])  # not the run's: must survive
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        alive = _gone_within(pids, 15)
        assert not alive, f"still running after the driver's SIGKILL: {alive}"
        assert bystander.poll() is None
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):  # gone, as it should be
                os.kill(pid, signal.SIGKILL)
        bystander.kill()
        bystander.wait()


def test_reaper_stops_a_descendant_without_the_mark() -> None:
    # `env -i` starts sleep with an empty environment: no mark to find it by. The watcher
    # recorded it as the driver's descendant while the driver ran (every SCAN_S seconds).
    from services.trainer.reaper import SCAN_S

    driver, pids = _run_driver(
        "import subprocess, time\n"
        "from services.trainer.reaper import start_reaper\n"
        "start_reaper(grace_s=1)\n"
        "child = subprocess.Popen(['env', '-i', 'sleep', '120'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    try:
        deadline = time.monotonic() + 10  # until `env` has exec'd sleep without it
        while b"SHUFFLE_R1_RUN_MARK" in Path(f"/proc/{pids[0]}/environ").read_bytes():
            assert time.monotonic() < deadline, "env -i kept the environment"
            time.sleep(0.05)
        time.sleep(2.5 * SCAN_S)  # at least one scan while the driver runs
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait()
        alive = _gone_within(pids, 15)
        assert not alive, f"still running after the driver's SIGKILL: {alive}"
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
