"""The trainer (the driver process, with the local Ray and the embedded Redis it started)
killed with SIGKILL mid-run: a second run in the same folder is refused while it runs
(issue #20, finding 5); nothing it started outlives it (finding 6); `shuffle-r1 train
--resume` continues from the last complete checkpoint with the same next batch an
uninterrupted run would have drawn.

In sync mode: the kill and the reaping are the same in both modes, and what async mode adds to
resuming (a checkpoint written while the producer has drawn ahead) is
tests/faults/test_async_faults.py's, in process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from transformers import AutoTokenizer

from services.trainer.metrics import read_metrics
from services.trainer.state import COMPLETE, checkpoint_dir
from shuffle_r1.config import load_config
from shuffle_r1.data import PromptSampler
from shuffle_r1.data.splits import load_prompt_splits
from shuffle_r1.models import resolve_model_path

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
STEPS = 3  # killed after step 1's checkpoint (or 2's); the resumed run trains the rest


def test_killed_trainer_resumes_with_the_same_next_batch(tmp_path: Path) -> None:
    overrides = [
        "--config",
        "configs/tiny_cpu.yaml",
        f"trainer.output_dir={tmp_path}",
        "trainer.run_name=faults-driver",
        f"trainer.total_steps={STEPS}",
        "trainer.save_every=1",
        "cluster.namespace=faults-driver",
        "reward.function=tests.e2e.reward_fns:distinct_char_share",
        "buffer.redis_url=embedded",  # a child redis-server, which must not outlive it
    ]
    cli = [sys.executable, "-m", "services.cli", "train"]
    # its own session, so the kill takes the driver and every Ray process it started
    driver = subprocess.Popen(
        [*cli, *overrides], cwd=ROOT, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    first = checkpoint_dir(tmp_path, 1) / COMPLETE
    deadline = time.monotonic() + 300
    while not first.exists():
        assert driver.poll() is None, driver.stderr.read().decode()[-3000:] if driver.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.1)
    # frozen, so it cannot finish every step while the second run starts (CI saw [3, 4] done):
    # a stopped process still holds the run's lock, and SIGKILL ends it as it would a running one
    os.kill(driver.pid, signal.SIGSTOP)
    second = subprocess.run([*cli, *overrides], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
    assert second.returncode == 3, second.stderr[-3000:]
    assert f"in use by another run (pid {driver.pid}" in second.stderr
    started = [p.pid for p in psutil.Process(driver.pid).children(recursive=True)]
    assert any(psutil.Process(p).name() == "redis-server" for p in started if psutil.pid_exists(p))
    os.kill(driver.pid, signal.SIGKILL)  # mid-run: after step 1's checkpoint; the driver only
    driver.wait(timeout=30)
    left = _wait_for_none(lambda: _of_session(driver.pid))
    assert not left, f"processes of the killed run still running 30 s later: {left}"
    # and every process it had started, also those outside its session (the watcher; a Ray
    # worker that left it), within the watcher's grace and kill passes
    outside = _wait_for_none(lambda: _of_pids(started))
    assert not outside, f"processes the killed run started still running 30 s later: {outside}"
    done = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "checkpoints").glob("step_*")
                  if (p / COMPLETE).exists())  # fmt: skip
    assert done and done[-1] < STEPS, done  # killed before the end
    resume_from = done[-1]

    resumed = subprocess.run(
        [*cli, *overrides, "--resume"], cwd=ROOT, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"trained {STEPS} steps" in resumed.stdout
    assert f"resumed from {checkpoint_dir(tmp_path, resume_from)}" in resumed.stderr

    # the resumed run drew what an uninterrupted run draws at each step after the checkpoint
    cfg = load_config(ROOT / overrides[1], overrides[2:])
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.learner.model_path))
    train, _, _, _ = load_prompt_splits(cfg.data, tokenizer)
    sampler = PromptSampler(len(train), cfg.trainer.rollout_batch_size, cfg.data.seed)
    order = [[train[i].example.uid for i in sampler.next_batch()] for _ in range(STEPS)]
    rows = read_metrics(tmp_path / "prompts.jsonl")  # the run's own record; last row of a step
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert [r["prompt_ids"] for r in rows] == order


def _running(p: psutil.Process) -> bool:
    """Whether ``p`` still runs (a zombie, or a process gone since it was listed, does not)."""
    try:
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _of_pids(pids: list[int]) -> list[psutil.Process]:
    found = []
    for pid in pids:
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return found


def _of_session(sid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                found.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return found


def _wait_for_none(listed: Callable[[], list[psutil.Process]], timeout_s: float = 30) -> list[str]:
    """Wait until none of the processes ``listed()`` returns still runs, or ``timeout_s``;
    return (and then kill) the names of those still there. Every wait ends by the deadline:
    a process that exits while it is being looked at counts as gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in listed() if _running(p)]
        if not alive:
            return []
        if time.monotonic() > deadline:
            names = []
            for p in alive:
                try:
                    names.append(f"{p.pid} {p.name()} {' '.join(p.cmdline()[:4])}")
                    p.kill()
                except psutil.NoSuchProcess:
                    continue
            return names
        time.sleep(0.2)
