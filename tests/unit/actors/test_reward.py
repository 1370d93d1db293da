"""Reward workers in a real Ray: real math verification, misbehaving functions, a dead worker."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import ray

from actors.reward import GRACE_S, RewardPool, RewardWorker, ScoreRequest
from shuffle_r1.config import RewardConfig

ROOT = Path(__file__).resolve().parents[3]
pytestmark = pytest.mark.usefixtures("ray_cluster")


def gsm8k_answers(k: int) -> list[str]:
    rows = (ROOT / "data/gsm8k/test.jsonl").read_text().splitlines()[:k]
    return [json.loads(r)["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in rows]


def test_pool_scores_real_gsm8k_answers_in_order() -> None:
    pool = RewardPool(RewardConfig(num_workers=2))
    try:
        answers = gsm8k_answers(12)
        reqs = []
        for i, a in enumerate(answers):
            guess = a if i % 3 else str(int(a) + 1)
            think = "" if i % 4 == 1 else "<think>work</think> "
            reqs.append(ScoreRequest(f"{think}So \\boxed{{{guess}}}", a))
        results = pool.score(reqs)
        expected = [
            (0.9 if i % 3 else 0.0) + (0.0 if i % 4 == 1 else 0.1) for i in range(len(answers))
        ]
        assert [round(r.reward, 6) for r in results] == pytest.approx(expected)
        assert all(r.error is None for r in results)
    finally:
        pool.shutdown()


def test_raising_nan_and_float_functions_give_counted_zero_rewards() -> None:
    worker = ray.remote(RewardWorker).remote(
        RewardConfig(function="tests.unit.actors.reward_fns:raises")
    )
    results = ray.get(worker.score.remote([ScoreRequest("fine", "1"), ScoreRequest("boom", "1")]))
    assert [r.reward for r in results] == [1.0, 0.0]
    assert "exploded on purpose" in (results[1].error or "")
    assert ray.get(worker.error_counts.remote()) == {"raised": 1}
    ray.kill(worker)

    nan_worker = ray.remote(RewardWorker).remote(
        RewardConfig(function="tests.unit.actors.reward_fns:returns_nan")
    )
    [nan_result] = ray.get(nan_worker.score.remote([ScoreRequest("x", "1")]))
    assert nan_result.reward == 0.0 and "non-finite" in (nan_result.error or "")
    ray.kill(nan_worker)

    float_worker = ray.remote(RewardWorker).remote(
        RewardConfig(function="tests.unit.actors.reward_fns:returns_float")
    )
    [r] = ray.get(float_worker.score.remote([ScoreRequest("x", "1")]))
    assert (r.reward, r.accuracy, r.error) == (0.25, 0.25, None)
    ray.kill(float_worker)


def test_hanging_function_is_abandoned_at_its_deadline() -> None:
    cfg = RewardConfig(function="tests.unit.actors.reward_fns:hangs", timeout_s=0.5)
    worker = ray.remote(RewardWorker).remote(cfg)
    ray.get(worker.ping.remote())
    start = time.monotonic()
    results = ray.get(
        worker.score.remote([ScoreRequest("ok", "1"), ScoreRequest("hang", "1"),
                             ScoreRequest("ok", "1")])
    )  # fmt: skip
    elapsed = time.monotonic() - start
    assert [r.reward for r in results] == [0.5, 0.0, 0.5]
    assert (results[1].error or "").startswith("hung")
    assert elapsed < cfg.timeout_s + GRACE_S + 5.0
    assert ray.get(worker.error_counts.remote()) == {"hung": 1}
    ray.kill(worker)


def test_unknown_function_path_fails_at_start_naming_it() -> None:
    worker = ray.remote(RewardWorker).remote(RewardConfig(function="no_such_module:fn"))
    with pytest.raises(ray.exceptions.RayActorError, match="no_such_module"):
        ray.get(worker.ping.remote())


def test_dead_worker_is_replaced_and_its_requests_resent() -> None:
    pool = RewardPool(RewardConfig(num_workers=2))
    try:
        answers = gsm8k_answers(6)
        reqs = [ScoreRequest(f"<think>x</think>\\boxed{{{a}}}", a) for a in answers]
        assert [r.reward for r in pool.score(reqs)] == [1.0] * 6
        ray.kill(pool.workers[1], no_restart=True)
        results = pool.score(reqs)
        assert [r.reward for r in results] == [1.0] * 6
        assert pool.resent == 3
    finally:
        pool.shutdown()
