"""Redis killed (SIGKILL) and restarted between a step's put and its sample.

With persistence (AOF, fsync always) nothing acknowledged is lost: the step trains on the
batch as put. Without it the restarted Redis is empty: the trainer sees fewer groups than it
put, puts them again from memory and trains on the full batch — never on a partial one.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from services.embedded_redis import EmbeddedRedis
from services.trainer.loop import Trainer
from shuffle_r1.config import load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
BATCH, N = 4, 4


@pytest.mark.parametrize("persistent", [True, False], ids=["aof", "no-persistence"])
def test_redis_restart_between_put_and_sample(tmp_path: Path, persistent: bool) -> None:
    redis = EmbeddedRedis(data_dir=tmp_path / "redis", appendonly=persistent).start()
    run = f"faults-redis-{'aof' if persistent else 'volatile'}"
    cfg = load_config(
        ROOT / "configs/tiny_cpu.yaml",
        [
            f"trainer.output_dir={tmp_path / 'out'}",
            f"trainer.run_name={run}",
            "trainer.save_every=0",
            f"trainer.rollout_batch_size={BATCH}",
            f"rollout.n={N}",
            f"buffer.redis_url={redis.url}",
            "reward.function=tests.e2e.reward_fns:distinct_char_share",
        ],
    )
    try:
        with Trainer(cfg) as trainer:
            first = trainer.step(0)
            client = trainer.buffer
            put_groups = client.put_groups

            def put_then_restart_redis(*args: Any, **kwargs: Any) -> Any:
                acknowledged = put_groups(*args, **kwargs)
                client.put_groups = put_groups  # type: ignore[method-assign]  # once
                redis.stop(kill=True)  # SIGKILL: no shutdown save
                redis.start()  # same port, same data folder
                return acknowledged

            client.put_groups = put_then_restart_redis  # type: ignore[method-assign]
            m = trainer.step(1)
            stats = trainer.buffer.stats(run)
    finally:
        redis.close()

    kept = BATCH * math.floor(cfg.algorithm.keep_ratio * N / 2)
    for row in (first, m):
        assert row["buffer/pairs_kept"] == kept
        assert 0 < row["buffer/batch_rollouts"] <= 2 * kept
        assert math.isfinite(row["learner/policy_loss"])
    held = {s.step: s.groups_stored for s in stats.steps}
    if persistent:
        assert "buffer/regenerated_steps" not in m  # nothing was lost
        assert held == {0: BATCH, 1: BATCH}
    else:
        assert m["buffer/regenerated_steps"] == 1  # lost, detected, put again
        assert held == {1: BATCH}  # step 0 went with the old Redis; step 1 is whole again
