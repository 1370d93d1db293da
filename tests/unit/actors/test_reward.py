"""Reward workers in a real Ray: real math verification, misbehaving functions, a dead worker."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import ray

from actors.reward import GRACE_S, RewardPool, RewardWorker, ScoreRequest
from actors.serving import wait_for_replicas
from services.trainer.metrics import named_score_means
from shuffle_r1.config import RewardConfig
from shuffle_r1.config.schema import RewardFunctionConfig
from shuffle_r1.data import load_examples, load_prompt_template
from tests.faults.procs import gone

ROOT = Path(__file__).resolve().parents[3]
FNS = "tests.unit.actors.reward_fns"
# the math reward, plus a record-taking function whose named scores say what it received
# (weight 0: the totals stay the math reward's)
MATH_AND_ECHO = [
    RewardFunctionConfig("shuffle_r1.rewards:math_reward", 1.0),
    RewardFunctionConfig(f"{FNS}:echoes_record", 0.0),
]
pytestmark = pytest.mark.usefixtures("ray_cluster")


def gsm8k_answers(k: int) -> list[str]:
    rows = (ROOT / "data/gsm8k/test.jsonl").read_text().splitlines()[:k]
    return [json.loads(r)["answer"].rsplit("####", 1)[1].strip().replace(",", "") for r in rows]


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_pool_scores_real_gsm8k_answers_in_order() -> None:
    pool = RewardPool(RewardConfig(num_workers=2, http_port=0), run_id="test-reward-order")
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
    assert ray.get(nan_worker.error_counts.remote()) == {"raised": 1}  # garbage is counted
    ray.kill(nan_worker)

    float_worker = ray.remote(RewardWorker).remote(
        RewardConfig(function="tests.unit.actors.reward_fns:returns_float")
    )
    [r] = ray.get(float_worker.score.remote([ScoreRequest("x", "1")]))
    assert (r.reward, r.accuracy, r.error) == (0.25, 0.25, None)
    ray.kill(float_worker)


@pytest.mark.slow  # 10 s on 2 busy cores: a worker, its process, math-verify's import
def test_a_record_function_gets_the_prompt_and_row_and_its_named_scores_come_back(
    tmp_path: Path,
) -> None:
    """reward.functions through a real worker: real GSM8K rows with a column added, their
    prompts rendered by the real default template, scored as the trainer scores them."""
    rows = (ROOT / "data/gsm8k/test.jsonl").read_text().splitlines()[:2]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({**json.loads(r), "level": i + 2}) + "\n"
                            for i, r in enumerate(rows)))  # fmt: skip
    examples = load_examples(data, problem_key="question", answer_format="gsm8k").examples
    template = load_prompt_template("")
    texts = [template.render(ex) for ex in examples]
    requests = [
        ScoreRequest(f"<think>x</think> \\boxed{{{ex.answer}}}", ex.answer, text, ex.columns, 0)
        for ex, text in zip(examples, texts, strict=True)
    ]
    cfg = RewardConfig(functions=[
        RewardFunctionConfig(f"{FNS}:echoes_record", 0.5),
        RewardFunctionConfig("shuffle_r1.rewards:math_reward", 1.0),
    ])  # fmt: skip
    worker = ray.remote(RewardWorker).remote(cfg)
    results = ray.get(worker.score.remote(requests))
    for i, (result, text) in enumerate(zip(results, texts, strict=True)):
        assert text.endswith(examples[i].problem) and len(text) > 300
        echoed = {"prompt_chars": float(len(text)), "level": float(i + 2), "images": 0.0,
                  "exact": 0.0}  # fmt: skip
        assert result.scores == {**echoed, "accuracy": 1.0, "format": 1.0}
        assert result.reward == pytest.approx(0.5 * sum(echoed.values()) + 1.0)
        assert (result.accuracy, result.error) == (1.0, None)
    means = named_score_means(results)  # the step's reward/<name> metrics
    assert means["reward/level"] == 2.5 and "reward/accuracy" not in means
    assert ray.get(worker.error_counts.remote()) == {}
    ray.kill(worker)


def test_hanging_function_is_killed_at_its_deadline() -> None:
    cfg = RewardConfig(function="tests.unit.actors.reward_fns:hangs", timeout_s=0.5)
    worker = ray.remote(RewardWorker).remote(cfg)
    [hung_pid] = ray.get(worker.ping.remote())["reward_pids"]
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
    assert not psutil.pid_exists(hung_pid)  # the hung call's process is gone, not abandoned
    [fresh_pid] = ray.get(worker.ping.remote())["reward_pids"]
    assert fresh_pid != hung_pid
    ray.kill(worker)
    assert gone(fresh_pid), "a reward process outlived its Ray worker"


def test_a_reward_process_that_dies_is_counted_and_replaced() -> None:
    worker = ray.remote(RewardWorker).remote(
        RewardConfig(function="tests.unit.actors.reward_fns:exits")
    )
    [pid] = ray.get(worker.ping.remote())["reward_pids"]
    results = ray.get(worker.score.remote([ScoreRequest("exit", "1"), ScoreRequest("ok", "1")]))
    assert [r.reward for r in results] == [0.0, 1.0]
    assert "exit code 3" in (results[0].error or "")
    assert ray.get(worker.error_counts.remote()) == {"died": 1}
    assert pid not in ray.get(worker.ping.remote())["reward_pids"]
    ray.kill(worker)


def test_unknown_function_path_fails_at_start_naming_it() -> None:
    worker = ray.remote(RewardWorker).remote(RewardConfig(function="no_such_module:fn"))
    with pytest.raises(ray.exceptions.RayActorError, match="no_such_module"):
        ray.get(worker.ping.remote())


def test_worker_killed_mid_call_is_replaced_and_its_requests_resent() -> None:
    cfg = RewardConfig(
        num_workers=2, http_port=0, function="tests.unit.actors.reward_fns:slow_exact"
    )
    pool = RewardPool(cfg, run_id="test-reward-death")
    try:
        reqs = [ScoreRequest(str(i), str(i % 3)) for i in range(6)]
        expected = [float(i == i % 3) for i in range(6)]
        assert [r.reward for r in pool.score(reqs)] == expected
        victim = pool.handle.broadcast("ping").results()[1]["pid"]
        killer = threading.Timer(0.5, os.kill, args=(victim, signal.SIGKILL))
        killer.start()
        results = pool.score(reqs)  # each replica holds one chunk of 3 (1.2 s) when it dies
        killer.join()
        assert [r.reward for r in results] == expected
        assert pool.resent == 3
        wait_for_replicas(pool.app, "RewardWorker", 2, timeout_s=60, handle=pool.handle)
        assert victim not in {p["pid"] for p in pool.handle.broadcast("ping").results()}
    finally:
        pool.shutdown()


def test_http_endpoint_scores_for_outside_callers_and_refuses_bad_bodies() -> None:
    cfg = RewardConfig(
        functions=MATH_AND_ECHO, num_workers=1, http_port=0, http_route="/test-reward"
    )
    pool = RewardPool(cfg, run_id="test-http")
    try:
        answers = gsm8k_answers(2)
        good = {
            "response": f"<think>x</think> \\boxed{{{answers[0]}}}",
            "reference_answer": answers[0],
        }
        status, one = post(pool.url, json.dumps(good).encode())
        assert status == 200
        assert (one["reward"], one["accuracy"], one["format"], one["error"]) == (
            1.0,
            1.0,
            1.0,
            None,
        )
        # the optional fields reach a record-taking function; its scores come back
        record = {
            **good,
            "prompt": "Solve it.",
            "row": {"level": 4, "tags": ["x"]},
            "num_images": 1,
        }
        status, echoed = post(pool.url, json.dumps(record).encode())
        assert status == 200 and echoed["reward"] == 1.0
        assert echoed["scores"] == {"accuracy": 1.0, "format": 1.0, "prompt_chars": 9.0,
                                    "level": 4.0, "images": 1.0, "exact": 0.0}  # fmt: skip
        assert post(pool.url, json.dumps(good).encode())[1]["scores"]["level"] == -1.0  # absent
        wrong = [{"response": "\\boxed{0}", "reference_answer": a} for a in answers]
        status, many = post(pool.url, json.dumps({"items": wrong}).encode())
        assert status == 200 and [r["reward"] for r in many["results"]] == [0.0, 0.0]
        for body, fragment in (
            (b"not json", "not JSON"),
            (json.dumps({"items": []}).encode(), "at least one item"),
            (json.dumps({"items": [{"response": "x"}]}).encode(), "items[0].reference_answer"),
            (json.dumps({"response": 3, "reference_answer": "1"}).encode(), "response must be"),
            (json.dumps({**good, "row": [1]}).encode(), "row must be an object"),
            (json.dumps({**good, "prompt": 1}).encode(), "prompt must be a string"),
            (json.dumps({"items": [{**good, "num_images": -1}]}).encode(), "items[0].num_images"),
            (json.dumps({**good, "num_images": True}).encode(), "num_images must be an integer"),
            (b'{"row": ' * 100_000, "nested too deep"),
        ):
            status, error = post(pool.url, body)
            assert status == 400 and fragment in error["error"], (body, error)
    finally:
        pool.shutdown()
