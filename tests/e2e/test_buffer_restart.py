"""The replay buffer's actor dies between two steps: Ray restarts it on a new port, the
trainer reconnects, and the step trains on the full batch (nothing lost, nothing doubled)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import ray

from services.trainer.loop import Trainer
from shuffle_r1.config import load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]


def test_trainer_reconnects_to_a_restarted_buffer(tmp_path: Path) -> None:
    cfg = load_config(
        ROOT / "configs/tiny_cpu.yaml",
        [
            f"trainer.output_dir={tmp_path}",
            "trainer.run_name=e2e-buffer-restart",
            "reward.function=tests.e2e.reward_fns:distinct_char_share",
            "trainer.save_every=0",
        ],
    )
    groups, n = cfg.trainer.rollout_batch_size, cfg.rollout.n
    with Trainer(cfg) as trainer:
        first = trainer.step(0)
        old_address = trainer.buffer.address
        ray.kill(trainer.buffer_actor, no_restart=False)  # Ray restarts it (max_restarts=-1)
        second = trainer.step(1)
        stats = trainer.buffer.stats(trainer.run_id)
    assert trainer.buffer.address != old_address
    assert second["buffer/reconnects"] == 1 and "buffer/reconnects" not in first
    kept = groups * math.floor(cfg.algorithm.keep_ratio * n / 2)
    assert second["buffer/pairs_kept"] == kept
    assert 0 < second["buffer/batch_rollouts"] <= 2 * kept
    # both steps' groups are in Redis exactly once, whichever server process wrote them
    assert [(s.step, s.groups_stored) for s in stats.steps] == [(0, groups), (1, groups)]
    assert stats.counters.groups_stored == 2 * groups
    assert math.isfinite(second["learner/policy_loss"])
