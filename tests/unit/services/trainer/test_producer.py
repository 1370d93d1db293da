"""The async mode's producer thread (services/trainer/producer.py): the staleness bound on
how far it runs ahead, the weights each step is made with, failures handed to the learner,
and stopping. Real threads; the produce function records what it was called with."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from services.trainer.producer import ProducerFailedError, RolloutProducer


class Recorder:
    """A produce function that notes (step, weights, learner step at the call) and can be
    made to block or raise at a step."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.calls: list[tuple[int, Any]] = []
        self.fail_at = fail_at
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, step: int, weights: Any) -> tuple[int, Any]:
        self.gate.wait(timeout=10)
        if step == self.fail_at:
            raise ValueError(f"engine error at step {step}")
        self.calls.append((step, weights))
        return step, weights


def wait_for(condition: Any, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_the_producer_runs_at_most_ahead_steps_beyond_the_learner(ahead: int) -> None:
    produce = Recorder()
    producer = RolloutProducer(produce, start=3, end=10, ahead=ahead, weights=None)
    try:
        wait_for(lambda: len(produce.calls) == ahead + 1)
        time.sleep(0.1)  # and no further while the learner has not finished step 3
        assert [s for s, _ in produce.calls] == list(range(3, 3 + ahead + 1))
        for step in range(3, 10):
            made, waited = producer.take(step)
            assert made == (step, made[1]) and waited >= 0
            producer.trained(step + 1, ("v", step + 1))
            # never more than `ahead` steps beyond the step the learner trains next
            assert max(s for s, _ in produce.calls) <= step + 1 + ahead
    finally:
        producer.stop(timeout_s=10)
    assert [s for s, _ in produce.calls] == list(range(3, 10))
    assert producer.idle_s > 0


def test_each_step_is_made_with_the_newest_weights_published_before_it_starts() -> None:
    produce = Recorder()
    producer = RolloutProducer(produce, start=0, end=4, ahead=1, weights=None)
    try:
        for step in range(4):
            producer.take(step)
            producer.trained(step + 1, step + 1)  # weight version = steps done
    finally:
        producer.stop(timeout_s=10)
    weights = dict(produce.calls)
    assert weights[0] is None and weights[1] is None  # made before any update
    for step in range(2, 4):
        # staleness at training time: (learner's version) - (generating version) <= ahead
        assert step - weights[step] <= 1


def test_a_failure_in_the_producer_reaches_the_learner_with_its_cause() -> None:
    producer = RolloutProducer(Recorder(fail_at=1), start=0, end=4, ahead=2, weights=None)
    assert producer.take(0)[0][0] == 0
    with pytest.raises(ProducerFailedError, match="before step 1: engine error at step 1") as info:
        producer.take(1)
    assert isinstance(info.value.__cause__, ValueError)
    producer.stop(timeout_s=10)


def test_stop_ends_the_thread_after_its_step_and_take_then_says_so() -> None:
    produce = Recorder()
    produce.gate.clear()  # step 0 blocks inside produce
    producer = RolloutProducer(produce, start=0, end=5, ahead=3, weights=None)
    stopper = threading.Thread(target=producer.stop, kwargs={"timeout_s": 10})
    stopper.start()
    time.sleep(0.05)
    produce.gate.set()  # step 0 finishes; nothing after it starts
    stopper.join(timeout=10)
    assert not stopper.is_alive()
    assert [s for s, _ in produce.calls] == [0]
    with pytest.raises(ProducerFailedError, match="stopped before step 0"):
        producer.take(0)  # dropped at stop


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="ahead >= 0"):
        RolloutProducer(Recorder(), start=0, end=3, ahead=-1, weights=None)
    with pytest.raises(ValueError, match="end >= start"):
        RolloutProducer(Recorder(), start=4, end=3, ahead=1, weights=None)
