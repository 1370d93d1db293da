"""``trainer.mode=async`` under the README's faults, in one run: the rollout side runs a step
ahead of the learner (``buffer.max_staleness=1``) while

- a rollout worker is killed (SIGKILL) mid-generation in the producer's step 1;
- the replay buffer's process is killed right after the producer put step 2;
- Redis (no persistence) is killed and restarted right after the producer put step 3.

The run finishes every step on the prompts a synchronous run draws, each generated once,
trains on whole batches only, counts every fault, and no rollout is ever more than one
weight version older than the policy it trains.

Then the driver is lost after the checkpoint of step 2, which was written while the producer
had already drawn step 2's prompts: ``--resume`` trains steps 2 and 3 again on the prompts an
uninterrupted run draws (the checkpoint holds the sampler as the learner left it). A learner
rank killed runs in both modes in its own test; the driver killed with SIGKILL and resumed
from the command line runs in sync mode (tests/faults/test_trainer_driver_killed.py): what
the kill does is the same in both modes, and what async mode adds to resuming is this.
"""

from __future__ import annotations

import math
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import ray

from services.embedded_redis import EmbeddedRedis
from services.trainer.loop import StepRollouts, Trainer
from services.trainer.metrics import read_metrics
from services.trainer.state import checkpoint_dir
from shuffle_r1.config import load_config
from shuffle_r1.data import PromptSampler
from tests.faults.procs import kill9, ray_actor_pids, working
from tests.faults.test_trainer_worker_deaths import when

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
RUN, STEPS, BATCH, N = "faults-async", 4, 4, 4
SAVED_AT = 2  # checkpoints after steps 2 and 4; the run resumes from the first
WORKER_KILLED_AT, BUFFER_KILLED_AFTER, REDIS_RESTARTED_AFTER = 1, 2, 3


def test_async_mode_survives_a_worker_the_buffer_and_redis_failing_then_resumes(
    tmp_path: Path, redis_url: str
) -> None:
    redis = EmbeddedRedis(data_dir=tmp_path / "redis", appendonly=False).start()
    out = tmp_path / "out"
    overrides = [
        f"trainer.output_dir={out}",
        f"trainer.run_name={RUN}",
        f"cluster.namespace={RUN}",
        "trainer.mode=async",
        "buffer.max_staleness=1",
        f"trainer.total_steps={STEPS}",
        f"trainer.save_every={SAVED_AT}",
        f"trainer.rollout_batch_size={BATCH}",
        f"rollout.n={N}",
        "rollout.max_response_length=96",  # long enough to be killed mid-generation
        "rollout.num_workers=2",
        "rollout.max_workers=2",
        "reward.function=tests.e2e.reward_fns:distinct_char_share",
    ]
    cfg = load_config(ROOT / "configs/tiny_cpu.yaml", [*overrides, f"buffer.redis_url={redis.url}"])
    producing: list[int] = []  # the step the producer is on
    drawn_at_save: list[int] = []  # the producer's step when checkpoint SAVED_AT was written
    ledgers: dict[int, dict[str, int]] = {}
    # Redis is restarted from a thread that outlives the run: a redis-server dies with the
    # thread that started it (PR_SET_PDEATHSIG), and the producer's thread ends before the run
    restart, restarted, finished = threading.Event(), threading.Event(), threading.Event()

    def restarter() -> None:
        if restart.wait(timeout=600):
            redis.stop(kill=True)  # no persistence: the restarted Redis is empty
            redis.start()
            restarted.set()
        finished.wait(timeout=600)

    keeper = threading.Thread(target=restarter, daemon=True)
    keeper.start()
    try:
        with Trainer(cfg) as trainer:
            victims = [w["pid"] for w in trainer.rollout.workers()]
            assert len(victims) == 2
            [buffer_pid] = ray_actor_pids("ReplayBufferHost")
            produce, put = trainer.produce, trainer.session.put

            def observed_produce(step: int, weights: Any, put: bool = True) -> StepRollouts:
                producing.append(step)
                return produce(step, weights, put)

            def put_then_fail(groups: list[Any]) -> Any:
                acknowledged = put(groups)
                step = groups[0].step
                if step == BUFFER_KILLED_AFTER:
                    kill9(buffer_pid)  # the buffer dies after acknowledging the put
                if step == REDIS_RESTARTED_AFTER:
                    restart.set()
                    assert restarted.wait(timeout=60), "Redis did not restart in 60 s"
                return acknowledged

            save = trainer.save

            def observed_save() -> Path:
                if trainer.state.step == SAVED_AT:
                    drawn_at_save.append(producing[-1])
                return save()

            trainer.save = observed_save  # type: ignore[method-assign]
            trainer.produce = observed_produce  # type: ignore[method-assign]
            trainer.session.put = put_then_fail  # type: ignore[method-assign]
            killer = when(
                lambda: (
                    producing[-1:] == [WORKER_KILLED_AT]
                    and trainer.rollout.pending > 0
                    and working(victims[0])
                ),
                lambda: kill9(victims[0]),
                timeout_s=300,
            )
            summary = trainer.run()
            killer.join(timeout=10)
            for step in range(STEPS):
                ledgers[step] = ray.get(trainer.rollout.store.generated.remote(f"s{step}/"))
            uids = [p.example.uid for p in trainer.train_prompts]
    finally:
        finished.set()
        keeper.join(timeout=30)
        redis.close()

    assert summary.steps == STEPS
    rows = read_metrics(summary.metrics_path)
    assert [r["step"] for r in rows] == list(range(STEPS))
    # the data order of a synchronous run, each prompt of each step generated exactly once
    reference = PromptSampler(len(uids), cfg.trainer.rollout_batch_size, cfg.data.seed)
    order = [[uids[i] for i in reference.next_batch()] for _ in range(STEPS)]
    assert [r["prompt_ids"] for r in read_metrics(summary.output_dir / "prompts.jsonl")] == order
    for step in range(STEPS):
        assert ledgers[step] == {f"s{step}/{uid}": 1 for uid in order[step]}, step
    kept = BATCH * math.floor(cfg.algorithm.keep_ratio * N / 2)
    for r in rows:  # whole batches only, and none staler than the bound
        assert r["buffer/pairs_kept"] == kept, r["step"]
        assert math.isfinite(r["learner/policy_loss"]), r["step"]
        assert r["staleness/max"] <= 1, r["step"]
        assert r["buffer/stale_dropped"] == 0, r["step"]
    assert rows[WORKER_KILLED_AT]["rollout/resent"] == BATCH // 2  # to the survivor
    assert rows[WORKER_KILLED_AT]["rollout/tokens"] == BATCH * N * 96  # every rollout, whole
    assert victims[0] not in ray_actor_pids("ServeReplica")
    assert rows[-1]["buffer/reconnects"] >= 1  # producer's put or learner's draw, or both
    assert rows[-1]["buffer/regenerated_steps"] >= 1  # lost with Redis, put again
    assert max(r["staleness/max"] for r in rows) == 1  # it did run ahead

    # The driver lost after checkpoint 2 (checkpoint 4 never written): the producer had drawn
    # step 2's prompts when checkpoint 2 was saved, and the resumed run still trains steps 2
    # and 3 on the prompts of the synchronous order
    assert drawn_at_save and drawn_at_save[0] >= SAVED_AT, drawn_at_save
    shutil.rmtree(checkpoint_dir(out, STEPS))
    resumed_cfg = load_config(  # one worker and short rollouts: the data order is the point
        ROOT / "configs/tiny_cpu.yaml",
        [
            *overrides,
            f"buffer.redis_url={redis_url}",
            "rollout.num_workers=1",
            "rollout.max_response_length=16",
        ],
    )
    with Trainer(resumed_cfg, resume=True) as resumed:
        assert resumed.state.step == SAVED_AT
        again = resumed.run()
    assert again.steps == STEPS
    assert [r["prompt_ids"] for r in read_metrics(out / "prompts.jsonl")] == order
    rerun = read_metrics(out / "metrics.jsonl")[SAVED_AT:]
    assert [r["step"] for r in rerun] == list(range(SAVED_AT, STEPS))
    assert all(math.isfinite(r["learner/policy_loss"]) for r in rerun)
