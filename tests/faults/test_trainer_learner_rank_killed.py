"""A learner rank killed (SIGKILL) in the middle of an update: the trainer rebuilds the learner
group from the last checkpoint by itself and the run goes on, training the steps after the
checkpoint again on the same prompts, in the same order."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import ray

from services.trainer.loop import Trainer
from services.trainer.metrics import read_metrics
from shuffle_r1.config import load_config
from shuffle_r1.data import PromptSampler
from tests.faults.procs import kill9

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
STEPS, KILLED_AT = 4, 3  # a checkpoint after 2 steps (save_every=2); rank 1 dies in step 3


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_killed_learner_rank_is_rebuilt_from_the_last_checkpoint(
    tmp_path: Path, mode: str
) -> None:
    cfg = load_config(
        ROOT / "configs/tiny_cpu.yaml",
        [
            f"trainer.output_dir={tmp_path}",
            f"trainer.run_name=faults-learner-{mode}",
            f"trainer.total_steps={STEPS}",
            "trainer.save_every=2",
            "reward.function=tests.e2e.reward_fns:distinct_char_share",
            f"trainer.mode={mode}",
            f"buffer.max_staleness={int(mode == 'async')}",
        ],
    )
    drawn: list[list[str]] = []  # the prompts of every step the trainer ran, in order
    with Trainer(cfg) as trainer:
        next_batch = trainer.sampler.next_batch

        def record() -> list[int]:
            batch = next_batch()
            drawn.append([trainer.train_prompts[i].example.uid for i in batch])
            return batch

        trainer.sampler.next_batch = record  # type: ignore[method-assign]  # observe only
        doomed = trainer.learner
        rank1 = ray.get(doomed.workers[1].ping.remote())["pid"]
        update = doomed.update

        def update_with_a_dying_rank(*args: Any, **kwargs: Any) -> Any:
            if trainer.state.step == KILLED_AT:  # the update of step 3
                kill9(rank1)
            return update(*args, **kwargs)

        doomed.update = update_with_a_dying_rank  # type: ignore[method-assign]
        summary = trainer.run()
        versions = [w["weight_version"] for w in trainer.rollout.workers()]
        final_version = trainer.learner.version
        uids = [p.example.uid for p in trainer.train_prompts]

    assert trainer.learner is not doomed
    assert summary.steps == STEPS
    reference = PromptSampler(len(uids), cfg.trainer.rollout_batch_size, cfg.data.seed)
    order = [[uids[i] for i in reference.next_batch()] for _ in range(STEPS)]
    # steps 0..3 (3 died), then from the step-2 checkpoint: 2 and 3 again, same prompts (3 is
    # the last step: in async mode the producer has nothing further to draw ahead)
    assert drawn == order[: KILLED_AT + 1] + order[2:]
    rows = read_metrics(summary.metrics_path)
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert rows[-1]["learner/rebuilt"] == 1
    for r in rows:
        assert math.isfinite(r["learner/policy_loss"]), r["step"]
    # the re-run steps were generated with the restored weights, under a new version number
    assert rows[2]["rollout/weight_version"] > rows[1]["weight_version"]
    assert set(versions) == {final_version}
