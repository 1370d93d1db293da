"""Workers killed with SIGKILL in the middle of a training step, and a reward function that
hangs: each step completes, with nothing lost, nothing doubled, and the fault counted.

One tiny job (2 rollout workers, 2 reward workers, 2 learner ranks, the replay buffer in its
actor) runs one step per fault, in order; the faults hit real processes at real moments.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray

from actors.reward import GRACE_S, RewardPool
from services.replay_buffer.client import ReplayBufferClient
from services.trainer.loop import Trainer
from shuffle_r1.config import load_config
from shuffle_r1.data import PromptSampler
from tests.faults.procs import kill9, ray_actor_pids, working

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
RUN = "faults-workers"
BATCH, N = 4, 4
FNS = "tests.faults.reward_fns"


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Trainer, str]]:
    """The job, and the answer digit its reward function hangs on: one that first appears in
    step 2's prompts (the sampler's order is fixed), so steps 0 and 1 do not hang."""
    cfg = load_config(
        ROOT / "configs/tiny_cpu.yaml",
        [
            f"trainer.output_dir={tmp_path_factory.mktemp('faults')}",
            f"trainer.run_name={RUN}",
            "trainer.save_every=0",
            f"trainer.rollout_batch_size={BATCH}",
            f"rollout.n={N}",
            "rollout.max_response_length=96",  # long enough to be killed mid-generation
            "rollout.num_workers=2",
            "rollout.max_workers=2",
            "reward.num_workers=2",
            # a call's deadline is timeout_s + GRACE_S (3 s): a 100 ms call under load from
            # the rest of the machine must still answer within it (2.3 s was once too short)
            "reward.timeout_s=1.0",
            "reward.function=tests.e2e.reward_fns:distinct_char_share",  # replaced below
        ],
    )
    with Trainer(cfg) as t:
        order = PromptSampler(len(t.train_prompts), BATCH, cfg.data.seed, cfg.data.shuffle)
        digits = [{t.train_prompts[i].example.answer[-1] for i in order.next_batch()}
                  for _ in range(50)]  # fmt: skip
        # the first batches k, k+1, k+2 such that an answer digit of the third is new
        k = next((k for k in range(48) if digits[k + 2] - digits[k] - digits[k + 1]), None)
        if k is None:
            pytest.fail(f"no three batches of the first 50 suit the test: {digits}")
        hang = min(digits[k + 2] - digits[k] - digits[k + 1])
        for _ in range(k):  # the job's steps 0, 1, 2 draw batches k, k+1, k+2
            t.sampler.next_batch()
        t.reward.shutdown()  # the reward role again, with the function that hangs on it
        t.reward = RewardPool(
            dataclasses.replace(cfg.reward, function=f"{FNS}:hangs_on_answers_ending_in_{hang}"),
            RUN,
        )
        yield t, hang


@pytest.fixture
def trainer(job: tuple[Trainer, str]) -> Trainer:
    return job[0]


def when(condition: Callable[[], bool], action: Callable[[], None], timeout_s: float = 120) -> Any:
    """Run ``action`` in a thread as soon as ``condition()`` holds (polled every 10 ms)."""

    def watch() -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)
        action()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def generated_once(t: Trainer, step: int) -> None:
    """The workers' own ledger: each of the step's prompts generated exactly once."""
    ledger = ray.get(t.rollout.store.generated.remote(f"s{step}/"))
    assert ledger == {f"s{step}/{uid}": 1 for uid in t.last_prompt_ids}


def trained_on_full_batch(m: dict[str, float], t: Trainer) -> None:
    kept = BATCH * math.floor(t.cfg.algorithm.keep_ratio * N / 2)
    assert m["buffer/pairs_kept"] == kept
    assert 0 < m["buffer/batch_rollouts"] <= 2 * kept
    assert math.isfinite(m["learner/policy_loss"])


def test_a_rollout_worker_killed_mid_generation_has_its_prompts_resent(trainer: Trainer) -> None:
    victims = [w["pid"] for w in trainer.rollout.workers()]
    assert len(victims) == 2
    killer = when(
        lambda: trainer.rollout.pending > 0 and working(victims[0]),  # generating
        lambda: kill9(victims[0]),
    )
    m = trainer.step(0)
    killer.join()
    assert m["rollout/resent"] == BATCH // 2  # the victim's chunk went to the survivor
    assert m["rollout/tokens"] == BATCH * N * 96  # every rollout, complete
    generated_once(trainer, 0)  # the victim died before it finished: nothing doubled
    trained_on_full_batch(m, trainer)
    assert victims[0] not in ray_actor_pids("ServeReplica")


def test_a_reward_worker_killed_mid_scoring_has_its_chunk_resent(trainer: Trainer) -> None:
    trainer.reward.resent = 0
    victims = ray_actor_pids(f"ServeReplica:{RUN}-reward:RewardWorker")  # not the endpoint
    assert len(victims) == 2
    # the function runs in the replica's reward process (shuffle_r1/rewards/isolation.py)
    [scorer] = [p.pid for p in psutil.Process(victims[0]).children()
                if "spawn_main" in " ".join(p.cmdline())]  # fmt: skip
    # the reward function works 100 ms of CPU per response: 8 responses a chunk, 0.8 s
    killer = when(lambda: working(scorer), lambda: kill9(victims[0]))
    m = trainer.step(1)
    killer.join()
    assert not psutil.pid_exists(scorer) or psutil.Process(scorer).status() == "zombie"
    assert trainer.reward.resent == BATCH * N // 2
    assert m["reward/errors"] == 0  # nothing failed, nothing was scored twice
    generated_once(trainer, 1)
    trained_on_full_batch(m, trainer)


@pytest.mark.serial  # counts the calls that missed their deadline: alone, even under pytest -n
def test_a_hanging_reward_function_is_timed_out_counted_and_the_run_goes_on(
    job: tuple[Trainer, str],
) -> None:
    trainer, digit = job
    counter = trainer.exporter.metrics["shuffle_r1_errors_total"].labels("reward", "hung")
    before = counter._value.get()
    started = time.monotonic()
    m = trainer.step(2)
    hung = hung_responses(trainer, digit)
    assert hung >= N  # at least one prompt's n rollouts
    assert m["reward/errors"] == hung
    assert counter._value.get() - before == hung  # the Prometheus counter
    # each hung call was abandoned at its deadline (timeout + grace), two workers in parallel
    assert time.monotonic() - started < 60 + hung * (trainer.cfg.reward.timeout_s + GRACE_S)
    generated_once(trainer, 2)
    trained_on_full_batch(m, trainer)


def test_the_buffer_killed_between_put_and_sample_serves_the_same_batch(trainer: Trainer) -> None:
    [pid] = ray_actor_pids("ReplayBufferHost")
    step = 20  # a step no earlier test used
    client = trainer.buffer
    seen: dict[str, Any] = {}
    put_groups = client.put_groups

    def put_then_kill(*args: Any, **kwargs: Any) -> Any:
        seen["put"] = put_groups(*args, **kwargs)
        client.put_groups = put_groups  # type: ignore[method-assign]  # once
        kill9(pid)  # the buffer process dies after acknowledging the put
        return seen["put"]

    client.put_groups = put_then_kill  # type: ignore[method-assign]
    m = trainer.step(step)
    assert trainer.buffer is not client  # the trainer reconnected to the restarted actor
    assert m["buffer/reconnects"] == 1
    restarted = ray_actor_pids("ReplayBufferHost")
    assert restarted and pid not in restarted  # Ray restarted it in a new process
    generated_once(trainer, step)
    trained_on_full_batch(m, trainer)
    # what the restarted service (reading Redis) serves is what a fresh client gets again
    with ReplayBufferClient(ray.get(trainer.buffer_actor.address.remote())) as fresh:
        again = fresh.sample(RUN, step, policy_version=0, spec=trainer.spec)
        stats = fresh.stats(RUN, step)
    assert [(i.prompt_id, i.rollout_index) for i in again.items] == [
        (i.prompt_id, i.rollout_index)
        for i in trainer.buffer.sample(RUN, step, 0, spec=trainer.spec).items
    ]
    assert len(again.items) == m["buffer/batch_rollouts"]
    assert [(s.step, s.groups_stored) for s in stats.steps if s.step == step] == [(step, BATCH)]


def hung_responses(t: Trainer, digit: str) -> int:
    """Responses of the last step whose reference answer makes the reward function hang."""
    answers = {p.example.uid: p.example.answer for p in t.train_prompts}
    return N * sum(answers[uid].endswith(digit) for uid in t.last_prompt_ids)
