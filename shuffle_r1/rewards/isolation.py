"""Run a reward function in worker processes, each call under a deadline that kills.

:class:`RewardProcessPool` keeps up to ``max_processes`` processes, started with
``multiprocessing``'s *spawn* method (a fresh interpreter: never ``fork`` from a process with
threads, as a Ray worker is). Each process imports the functions once (:func:`load_reward_fn`)
and runs every call in its **main thread**, so signal-based timeouts inside the function work
(math-verify's, :func:`shuffle_r1.rewards.equivalent`). The parent waits ``deadline_s`` seconds
for each answer; past that the process is killed with SIGKILL, the call is reported as hung and
the next call gets a fresh process. A call that raises, or a process that dies during a call
(a segfault, ``os._exit``), is reported the same way; the caller decides the score.

Nothing outlives the process that owns the pool: each worker process asks Linux for SIGKILL
when its parent thread ends (``prctl(PR_SET_PDEATHSIG)``; the processes are started from one
thread the pool keeps for that, because the signal follows the *thread* that started a
child), and the pool's daemonic processes are killed at a normal interpreter exit. The worker
processes inherit the parent's environment, so the run's reaper finds them by its mark
(``services/trainer/reaper.py``). Ctrl-C is ignored in them: it is the parent's to handle.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from shuffle_r1.procs import die_with_parent
from shuffle_r1.rewards.loader import load_reward_fn
from shuffle_r1.rewards.record import RewardInput, call_reward

logger = logging.getLogger(__name__)

# How long a fresh process may take to start and import the function (a spawned interpreter
# in a Ray worker imports Ray again as its __main__, ~0.6 s; math-verify ~0.4 s).
START_TIMEOUT_S = 60.0
MAX_ERROR_CHARS = 500


@dataclass(frozen=True)
class CallOutcome:
    """What one call gave: ``value``, whatever the function returned, when ``error`` is None;
    else ``error`` says why there is no value, prefixed by its kind: ``"raised: ..."`` (the
    function raised, or returned something that cannot be sent back), ``"hung: ..."`` (no
    answer within the deadline: the process was killed) or ``"died: ..."`` (the process ended
    during the call, or none could be started)."""

    value: Any = None
    error: str | None = None


@dataclass(frozen=True, eq=False)  # compared and hashed by identity
class _Worker:
    process: BaseProcess
    conn: Connection


class RewardProcessPool:
    """Calls the reward functions named ``functions`` (``"module:function"`` each, or one such
    string) in up to ``max_processes`` worker processes, one call per process at a time, each
    answered within ``deadline_s`` seconds or killed (see the module docstring).

    Thread-safe: concurrent :meth:`call` s use different processes, and wait while all
    ``max_processes`` are busy. The first process starts here; more start when concurrent
    calls need them, and a killed or dead one is replaced at the next call. ``stats`` counts
    ``starts``, ``kills`` (hung calls) and ``deaths`` (processes that ended by themselves).

    Raises:
        ValueError: ``deadline_s`` is not > 0 or ``max_processes`` < 1; or the function does
            not load in the worker process (the message of :func:`load_reward_fn`, or what the
            module raised while imported).
        RuntimeError: the first process did not start within ``start_timeout_s`` seconds or
            exited while starting.
    """

    def __init__(
        self,
        functions: str | Sequence[str],
        deadline_s: float,
        max_processes: int = 1,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        if not deadline_s > 0:
            raise ValueError(f"deadline_s must be > 0 seconds, got {deadline_s!r}")
        if max_processes < 1:
            raise ValueError(f"max_processes must be >= 1, got {max_processes!r}")
        self.functions = (functions,) if isinstance(functions, str) else tuple(functions)
        if not self.functions:
            raise ValueError("a reward process pool needs at least one function")
        self.deadline_s = deadline_s
        self.max_processes = max_processes
        self.start_timeout_s = start_timeout_s
        self.stats: Counter[str] = Counter()
        self._ctx = multiprocessing.get_context("spawn")
        # PR_SET_PDEATHSIG fires when the thread that started a child ends: start them all from
        # this one thread, which lives as long as the pool, not from short-lived callers.
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="reward-spawner")
        self._cond = threading.Condition()
        self._workers: set[_Worker] = set()  # alive or being used, busy or idle
        self._idle: list[_Worker] = []
        self._starting = 1  # the first process, started now
        self._closed = False
        try:
            self._idle.append(self._start())
        except BaseException:
            self._spawner.shutdown(wait=False)
            raise

    def call(self, record: RewardInput, fn: int = 0, **legacy_kwargs: Any) -> CallOutcome:
        """The ``fn``-th function called with ``record`` in a worker process
        (:func:`~shuffle_r1.rewards.record.call_reward`: ``record`` itself, or its response
        and reference answer with ``legacy_kwargs``): its return value, or why there is none.

        Returns within ``deadline_s`` seconds of the request reaching a process (plus, when
        none is idle, the wait for one and a process start, ~1 s). Never raises for what the
        function does; the arguments and the return value must be picklable.

        Raises:
            RuntimeError: the pool is closed.
        """
        try:
            worker = self._acquire()
        except (ValueError, RuntimeError) as exc:
            if self._closed:
                raise
            error = f"died: no reward process could start: {exc}"
            return CallOutcome(error=error[:MAX_ERROR_CHARS])
        try:
            worker.conn.send((fn, record, legacy_kwargs))
            if not worker.conn.poll(self.deadline_s):
                self._discard(worker)
                self._count("kills")
                return CallOutcome(
                    error=f"hung: no answer in {self.deadline_s:.1f} s; its process "
                    f"(pid {worker.process.pid}) was killed"
                )
            status, payload = worker.conn.recv()
        except (EOFError, OSError):  # the process is gone (or its pipe broke)
            code = self._discard(worker, wait_s=1.0)
            self._count("deaths")
            logger.warning("reward process %s died during a call (%s)", worker.process.pid, code)
            return CallOutcome(error=f"died: the reward process ended during the call ({code})")
        except Exception as exc:  # the answer arrived whole but does not unpickle here
            self._release(worker)
            error = f"raised: returned a value that cannot be read back: {exc!r}"
            return CallOutcome(error=error[:MAX_ERROR_CHARS])
        except BaseException:  # interrupted mid-call: the process's state is unknown
            self._discard(worker)
            raise
        self._release(worker)
        if status == "raised":
            return CallOutcome(error=f"raised: {payload}"[:MAX_ERROR_CHARS])
        return CallOutcome(value=payload)

    def pids(self) -> list[int]:
        """The process ids of the pool's worker processes now (busy or idle)."""
        with self._cond:
            return sorted(w.process.pid for w in self._workers if w.process.pid is not None)

    def close(self) -> None:
        """Kill every worker process; :meth:`call` raises afterwards. Safe to call twice; a
        call in flight ends as ``died``."""
        with self._cond:
            self._closed = True
            workers = list(self._workers)
            self._cond.notify_all()
        for worker in workers:
            self._discard(worker)
        self._spawner.shutdown(wait=False)

    def __enter__(self) -> RewardProcessPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _count(self, what: str) -> None:
        with self._cond:
            self.stats[what] += 1

    def _acquire(self) -> _Worker:
        """An idle, live worker, started when none is idle and fewer than ``max_processes``
        run; waits otherwise."""
        while True:
            with self._cond:
                while not self._idle and len(self._workers) + self._starting >= self.max_processes:
                    if self._closed:
                        raise RuntimeError("the reward process pool is closed")
                    self._cond.wait()
                if self._closed:
                    raise RuntimeError("the reward process pool is closed")
                worker = self._idle.pop() if self._idle else None
                if worker is None:
                    self._starting += 1
            if worker is None:
                return self._start()
            if worker.process.is_alive():
                return worker
            code = self._discard(worker, wait_s=1.0)  # it died between calls: replace it
            self._count("deaths")
            logger.warning("reward process %s died while idle (%s)", worker.process.pid, code)

    def _release(self, worker: _Worker) -> None:
        with self._cond:
            if not self._closed and worker in self._workers:
                self._idle.append(worker)
                self._cond.notify()
                return
        self._discard(worker)

    def _discard(self, worker: _Worker, wait_s: float = 0.0) -> str:
        """SIGKILL the worker's process if it still runs after ``wait_s`` seconds (a dying
        process keeps its own exit code), reap it; how it ended, in words."""
        with self._cond:
            self._workers.discard(worker)
            if worker in self._idle:
                self._idle.remove(worker)
            self._cond.notify()
        process = worker.process
        if wait_s > 0:
            process.join(wait_s)
        if process.exitcode is None:
            process.kill()
        process.join(5.0)
        worker.conn.close()
        return _describe_exit(process.exitcode)

    def _start(self) -> _Worker:
        """A new worker, ready (its function imported), started on the spawner thread; the
        caller has counted it in ``_starting``."""
        try:
            worker = self._spawner.submit(self._spawn).result()
        except BaseException:
            with self._cond:
                self._starting -= 1
                self._cond.notify()
            raise
        with self._cond:
            self._starting -= 1
            self._workers.add(worker)
            closed = self._closed
        if closed:
            self._discard(worker)
            raise RuntimeError("the reward process pool is closed")
        return worker

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe()
        process = self._ctx.Process(
            target=_serve,
            args=(child_conn, self.functions, os.getpid()),
            name="reward-fn",
            daemon=True,  # killed at a normal exit; never joined while it hangs
        )
        process.start()
        child_conn.close()
        self._count("starts")
        worker = _Worker(process, parent_conn)
        try:
            if not parent_conn.poll(self.start_timeout_s):
                raise RuntimeError(
                    f"a reward process for {', '.join(self.functions)} did not start within "
                    f"{self.start_timeout_s:g} s"
                )
            status, payload = parent_conn.recv()
        except EOFError:
            process.join(5.0)
            worker.conn.close()
            raise RuntimeError(
                f"a reward process for {', '.join(self.functions)} ended while starting "
                f"({_describe_exit(process.exitcode)})"
            ) from None
        except BaseException:
            self._discard(worker)
            raise
        if status != "ready":
            self._discard(worker)
            raise ValueError(payload)
        return worker


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running after SIGKILL"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _serve(conn: Connection, functions: Sequence[str], parent_pid: int) -> None:
    """A worker process's main loop: import ``functions`` once, then answer each
    ``(index, record, legacy_kwargs)`` with ``("ok", value)`` or ``("raised", repr)``, until
    the pipe closes."""
    die_with_parent(parent_pid)  # SIGKILL when the starting thread ends
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    fns = []
    for function in functions:
        try:
            fns.append(load_reward_fn(function))
        except ValueError as exc:
            conn.send(("load_error", str(exc)))
            return
        except Exception as exc:  # the module's own code may raise anything while imported
            module = function.partition(":")[0]
            conn.send(
                (
                    "load_error",
                    f"reward function {function!r}: importing module {module!r} raised "
                    f"{type(exc).__name__}: {exc}",
                )
            )
            return
    conn.send(("ready", None))
    while True:
        try:
            index, record, kwargs = conn.recv()
        except EOFError:  # the parent closed the pool or is gone
            return
        try:
            reply: tuple[str, Any] = ("ok", call_reward(fns[index], record, **kwargs))
        except Exception as exc:  # a pluggable function may raise anything
            reply = ("raised", repr(exc)[:MAX_ERROR_CHARS])
        try:
            conn.send(reply)  # pickled whole before anything is written
        except Exception as exc:
            what = type(reply[1]).__name__
            conn.send(("raised", f"returned a {what} that cannot be sent back: {exc!r}"))
