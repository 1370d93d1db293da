"""The rollout side of ``trainer.mode=async``: a thread that generates, scores and puts the
groups of the next steps while the learner trains (README "Asynchronous mode").

The producer runs ``produce(step, weights)`` for ``start, start + 1, ...`` in order and hands
each result to the learner's thread (:meth:`RolloutProducer.take`). It runs at most
``ahead`` steps beyond the step the learner trains next: generating step ``s`` waits until
the learner has finished step ``s - ahead - 1``. Each step is generated with the newest
weights the learner has published when it starts (:meth:`RolloutProducer.trained`), so a
step trained at weight version ``v`` was generated at ``v - ahead`` or newer: its
staleness is at most ``ahead`` weight versions (the replay buffer enforces the same bound,
``buffer.max_staleness``, and drops and counts a group beyond it).

The data order is the synchronous run's: the same prompts and sampling seed per step, drawn
in step order, so a checkpoint and ``--resume`` mean the same in both modes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
Weights = Any  # (version, ObjectRef) of published weights, or None: the initial model


class ProducerFailedError(RuntimeError):
    """The producer thread raised; the original exception is the ``__cause__``."""


class RolloutProducer(Generic[T]):
    """Produces steps ``start`` .. ``end - 1`` in a thread, at most ``ahead`` beyond the
    learner; see the module doc.

    Args:
        produce: ``produce(step, weights) -> T``, one step's scored rollouts.
        start: the first step to produce (the step the learner trains next).
        end: one past the last step (``trainer.total_steps``).
        ahead: how many steps beyond the learner's the producer may be (``>= 0``; 0 is the
            synchronous order, one phase at a time).
        weights: the newest published weights now.

    Raises:
        ValueError: ``ahead < 0`` or ``end < start``.
    """

    def __init__(
        self,
        produce: Callable[[int, Weights], T],
        start: int,
        end: int,
        ahead: int,
        weights: Weights,
    ) -> None:
        if ahead < 0 or end < start:
            raise ValueError(f"need ahead >= 0 and end >= start, got {ahead=}, {start=}, {end=}")
        self._produce = produce
        self._end = end
        self.ahead = ahead
        self._cond = threading.Condition()
        self._ready: dict[int, T] = {}
        self._error: BaseException | None = None
        self._learner_step = start  # the step the learner trains next
        self._weights = weights
        self._stopping = False
        self._next = start  # the step the producer makes next
        self.idle_s = 0.0  # waiting on the bound, cumulative (seconds)
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = self._next
        try:
            while step < self._end:
                with self._cond:
                    waited = time.perf_counter()
                    while not self._stopping and step > self._learner_step + self.ahead:
                        self._cond.wait()
                    self.idle_s += time.perf_counter() - waited
                    if self._stopping:
                        return
                    weights = self._weights
                produced = self._produce(step, weights)  # outside the lock: the long part
                with self._cond:
                    self._ready[step] = produced
                    self._next = step + 1
                    self._cond.notify_all()
                step += 1
        except BaseException as exc:  # handed to the learner's thread by take()
            logger.exception("the rollout producer failed at step %d", step)
            with self._cond:
                self._error = exc
                self._cond.notify_all()

    def take(self, step: int) -> tuple[T, float]:
        """Wait for step ``step``'s result; returns it and the seconds waited (the learner's
        idle time).

        Raises:
            ProducerFailedError: the producer raised (before producing ``step``), or it
                stopped without producing ``step``.
        """
        started = time.perf_counter()
        with self._cond:
            while step not in self._ready:
                if self._error is not None:
                    raise ProducerFailedError(
                        f"the rollout producer failed before step {step}: {self._error}"
                    ) from self._error
                if not self._thread.is_alive():
                    raise ProducerFailedError(
                        f"the rollout producer stopped before step {step} (it was at step "
                        f"{self._next}, ends at {self._end})"
                    )
                self._cond.wait(timeout=1.0)  # wakes for signals (Ctrl-C) in the main thread
            return self._ready.pop(step), time.perf_counter() - started

    def trained(self, steps_done: int, weights: Weights) -> None:
        """The learner finished every step below ``steps_done`` and published ``weights``:
        the producer may go on to step ``steps_done + ahead`` with them."""
        with self._cond:
            self._learner_step = steps_done
            self._weights = weights
            self._cond.notify_all()

    def stop(self, timeout_s: float | None = None) -> None:
        """Stop after the step in progress and wait up to ``timeout_s`` (None: for as long
        as it takes) for the thread; results not taken are dropped."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("the rollout producer is still in its step after %s s", timeout_s)
        with self._cond:
            self._ready.clear()
