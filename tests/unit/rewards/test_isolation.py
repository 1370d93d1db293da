"""The reward process pool with real processes: hung calls killed, dead processes replaced,
raising functions reported, nothing left behind when the owner dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from services.trainer.reaper import MARK_ENV, marked
from shuffle_r1.rewards import RewardInput, RewardProcessPool, RewardResult
from tests.faults.procs import gone

ROOT = Path(__file__).resolve().parents[3]
FNS = "tests.unit.actors.reward_fns"
# An answer whose comparison with "1" does not finish (sympy evaluates the power tower).
HANGING_ANSWER = "9^{9^{9^{9}}}"


@pytest.mark.serial  # times itself
def test_a_hanging_call_is_killed_at_the_deadline_and_its_process_replaced() -> None:
    with RewardProcessPool(f"{FNS}:hangs", deadline_s=0.5) as pool:
        [pid] = pool.pids()
        start = time.monotonic()
        outcome = pool.call(RewardInput("hang", "1"))
        elapsed = time.monotonic() - start
        assert outcome.value is None and (outcome.error or "").startswith("hung: no answer")
        assert 0.5 <= elapsed < 0.5 + 1.0
        assert not psutil.pid_exists(pid)  # killed and reaped, not abandoned
        assert pool.call(RewardInput("ok", "1")).value == RewardResult(0.5, 0.0, 1.0)
        [replacement] = pool.pids()
        assert replacement != pid
        assert pool.stats == {"starts": 2, "kills": 1}


def test_a_raising_function_is_reported_and_its_process_kept() -> None:
    with RewardProcessPool(f"{FNS}:raises", deadline_s=5.0) as pool:
        [pid] = pool.pids()
        outcome = pool.call(RewardInput("boom", "1"))
        assert outcome.value is None
        assert outcome.error == "raised: RuntimeError('reward function exploded on purpose')"
        assert pool.call(RewardInput("fine", "1")).value == RewardResult(1.0, 1.0, 0.0)
        assert pool.pids() == [pid] and pool.stats == {"starts": 1}


@pytest.mark.parametrize(("response", "how"), [("exit", "exit code 3"), ("segv", "SIGSEGV")])
def test_a_process_that_dies_mid_call_is_reported_and_replaced(response: str, how: str) -> None:
    with RewardProcessPool(f"{FNS}:exits", deadline_s=5.0) as pool:
        [pid] = pool.pids()
        outcome = pool.call(RewardInput(response, "1"))
        assert outcome.value is None
        assert (outcome.error or "").startswith("died: the reward process ended during the call")
        assert how in (outcome.error or "")
        assert not psutil.pid_exists(pid)
        assert pool.call(RewardInput("fine", "1")).value == RewardResult(1.0, 1.0, 0.0)
        assert pool.pids() != [pid] and pool.stats == {"starts": 2, "deaths": 1}


def test_a_process_killed_between_calls_is_replaced_before_the_next() -> None:
    with RewardProcessPool(f"{FNS}:exits", deadline_s=5.0) as pool:
        [pid] = pool.pids()
        os.kill(pid, signal.SIGKILL)
        assert gone(pid)
        fine = pool.call(RewardInput("fine", "1")).value
        assert fine == RewardResult(1.0, 1.0, 0.0)  # not scored 0
        assert pool.stats == {"starts": 2, "deaths": 1}


def test_a_return_value_that_cannot_be_sent_back_is_reported() -> None:
    with RewardProcessPool(f"{FNS}:returns_unpicklable", deadline_s=5.0) as pool:
        outcome = pool.call(RewardInput("x", "1"))
        assert (outcome.error or "").startswith("raised: returned a function that cannot be sent")
        assert pool.call(RewardInput("x", "1")).error is not None  # the process still answers


def test_the_function_is_imported_once_per_process() -> None:
    with RewardProcessPool(f"{FNS}:counts_calls", deadline_s=5.0) as pool:
        assert [pool.call(RewardInput(str(i), "1")).value for i in range(3)] == [1.0, 2.0, 3.0]


@pytest.mark.serial  # times itself
def test_concurrent_calls_run_in_separate_processes_up_to_the_maximum() -> None:
    with RewardProcessPool(f"{FNS}:sleeps", deadline_s=5.0, max_processes=2) as pool:
        with ThreadPoolExecutor(3) as callers:
            start = time.monotonic()
            pids = list(callers.map(lambda _: pool.call(RewardInput("0.6", "1")).value, range(3)))
            elapsed = time.monotonic() - start
        assert len(set(pids)) == 2 and len(pool.pids()) == 2  # the third waited for one
        assert 1.2 <= elapsed < 1.2 + 2.0  # two rounds of 0.6 s, not three


@pytest.mark.serial  # times itself
def test_math_verify_times_out_in_the_process_main_thread_for_callers_in_any_thread() -> None:
    response = f"<think>x</think>\\boxed{{{HANGING_ANSWER}}}"
    with (
        RewardProcessPool(
            "shuffle_r1.rewards:math_reward", deadline_s=5.0, max_processes=2
        ) as pool,
        ThreadPoolExecutor(2) as callers,
    ):
        pool.call(RewardInput("\\boxed{1}", "1"))  # math-verify imported in one process
        start = time.monotonic()
        hung = callers.submit(pool.call, RewardInput(response, "1"), timeout_s=0.5)
        fine = callers.submit(pool.call, RewardInput("<think>x</think>\\boxed{72}", "72"))
        result = hung.result().value
        assert result.error is not None and result.error.startswith("timeout")
        assert result.reward == pytest.approx(0.1)  # accuracy 0, format still counts
        assert fine.result().value == RewardResult(1.0, 1.0, 1.0, None)
        assert time.monotonic() - start < 0.5 + 3.0  # math-verify's import in the second
        assert pool.stats["kills"] == 0  # the deadline fired inside the process
    assert threading.current_thread() is threading.main_thread()


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("no_such_module:fn", "cannot import module 'no_such_module'"),
        ("shuffle_r1.rewards:no_such_fn", "has no attribute 'no_such_fn'"),
        ("tests.unit.rewards.raises_on_import:fn", "raised AttributeError: this module fails"),
    ],
)
def test_a_function_that_does_not_load_fails_the_pool_naming_it(
    function: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message) as info:
        RewardProcessPool(function, deadline_s=1.0)
    assert repr(function) in str(info.value)


def test_processes_outlive_the_thread_that_started_them() -> None:
    """PR_SET_PDEATHSIG follows the starting thread: the pool starts from a thread of its own."""
    box: list[RewardProcessPool] = []
    creator = threading.Thread(target=lambda: box.append(RewardProcessPool(f"{FNS}:exits", 5.0)))
    creator.start()
    creator.join()
    with box[0] as pool:
        [pid] = pool.pids()
        time.sleep(0.5)  # a parent-death signal would have arrived by now
        assert pool.call(RewardInput("fine", "1")).value == RewardResult(1.0, 1.0, 0.0)
        assert pool.pids() == [pid]


def test_processes_carry_the_run_mark_and_die_with_their_owner() -> None:
    """The reaper's environment mark is inherited; SIGKILL of the owner kills them too."""
    mark = f"test-isolation-{os.getpid()}"
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from shuffle_r1.rewards import RewardInput, RewardProcessPool\n"
            "if __name__ == '__main__':\n"
            f"    pool = RewardProcessPool({FNS + ':sleeps'!r}, 60.0)\n"
            "    pool.call(RewardInput('0', '1'))\n"
            "    print(*pool.pids(), flush=True)\n"
            "    pool.call(RewardInput('3600', '1'))\n",
        ],
        cwd=ROOT,
        env={**os.environ, MARK_ENV: mark},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        [pid] = map(int, owner.stdout.readline().split())
        assert pid in marked(mark)  # what the run's reaper looks for
        time.sleep(0.3)  # the call of an hour is running in it
        owner.kill()
        owner.wait()
        assert gone(pid, timeout_s=5.0), "the reward process outlived its owner"
        assert not [p for p in marked(mark) if not gone(p, timeout_s=5.0)]
    finally:
        owner.kill()
        owner.wait()


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="deadline_s"):
        RewardProcessPool(f"{FNS}:raises", deadline_s=0)
    with pytest.raises(ValueError, match="max_processes"):
        RewardProcessPool(f"{FNS}:raises", deadline_s=1.0, max_processes=0)


def test_a_closed_pool_kills_its_processes_and_refuses_calls() -> None:
    pool = RewardProcessPool(f"{FNS}:raises", deadline_s=1.0)
    [pid] = pool.pids()
    pool.close()
    assert not psutil.pid_exists(pid)
    with pytest.raises(RuntimeError, match="closed"):
        pool.call(RewardInput("x", "1"))
    pool.close()


def test_one_process_serves_several_functions_each_with_its_own_call() -> None:
    """reward.functions: one pool loads them all; ``fn`` picks one, and a record-taking
    function gets the record while a legacy one gets (response, reference_answer)."""
    record = RewardInput("42", "42", "What is 6 * 7?", {"level": 2}, num_images=1)
    with RewardProcessPool([f"{FNS}:echoes_record", f"{FNS}:raises"], deadline_s=5.0) as pool:
        assert pool.call(record, 0).value == {
            "prompt_chars": 14.0,
            "level": 2.0,
            "images": 1.0,
            "exact": 1.0,
        }
        assert pool.call(record, 1, timeout_s=1.0).value == RewardResult(1.0, 1.0, 0.0)
        assert pool.stats == {"starts": 1}
