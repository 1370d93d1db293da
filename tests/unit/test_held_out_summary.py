"""The run summary's held-out accuracy before and after training, with its interval
(services/trainer/metrics.py ``held_out_summary`` and ``wilson_interval``)."""

from __future__ import annotations

import pytest

from services.trainer.metrics import held_out_summary, wilson_interval


@pytest.mark.parametrize(
    ("share", "trials", "expected"),
    [
        # Wilson score intervals, z = 1.96 (values from the closed form, 4 decimals)
        (0.3, 200, (0.2407, 0.3668)),
        (0.0, 10, (0.0, 0.2775)),
        (1.0, 10, (0.7225, 1.0)),
        (0.5, 100, (0.4038, 0.5962)),
    ],
)
def test_wilson_interval(share: float, trials: int, expected: tuple[float, float]) -> None:
    low, high = wilson_interval(share, trials)
    assert (round(low, 4), round(high, 4)) == expected


def test_wilson_interval_without_trials_is_everything() -> None:
    assert wilson_interval(0.5, 0) == (0.0, 1.0)


def test_held_out_summary_takes_the_evaluation_before_training_and_the_last() -> None:
    rows = [
        {"step": -1, "val/accuracy": 0.30, "val/samples": 200.0},
        {"step": 0, "reward/mean": 0.1},
        {"step": 9, "val/accuracy": 0.49, "val/samples": 200.0},
        {"step": 19, "val/accuracy": 0.575, "val/samples": 200.0},
    ]
    out = held_out_summary(rows)
    assert out is not None
    assert (out["acc_before"], out["acc_after"], out["after_step"]) == (0.30, 0.575, 20)
    assert out["n_eval"] == 200 and out["gain"] == pytest.approx(0.275)
    assert out["acc_before_ci"] == wilson_interval(0.30, 200)
    assert out["acc_after_ci"] == wilson_interval(0.575, 200)


def test_held_out_summary_of_a_run_without_a_baseline_or_without_evaluations() -> None:
    resumed = held_out_summary([{"step": 4, "val/accuracy": 0.4, "val/samples": 50.0}])
    assert resumed is not None and "acc_before" not in resumed and "gain" not in resumed
    assert held_out_summary([{"step": 0, "reward/mean": 0.0}]) is None
