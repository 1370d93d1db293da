"""Elastic rollout, in both trainer modes: a running tiny job is scaled from 1 to 2 rollout
workers and back to 1 by hand, mid-run, with the user's command (`shuffle-r1 scale rollout
N`, run as a separate process against the job's Ray cluster). Once a step has run on the one
worker left, the operator stops the run (`Trainer.stop`). It ends with every prompt of every
step generated exactly once (the workers' own ledger) and the newest weights on every
worker."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import ray

from services.trainer.loop import Trainer
from services.trainer.metrics import read_metrics
from shuffle_r1.config import load_config
from shuffle_r1.data import PromptSampler

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
MAX_STEPS = 30  # a bound: the operator stops the run when it has seen 1, 2, then 1 worker


def scale_command(run: str, n: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "scale", "rollout", str(n), "--run", run,
         "--address", ray.get_runtime_context().gcs_address, "--namespace", "shuffle-r1-tests",
         "--wait", "120"],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_rollout_workers_scale_up_and_down_while_the_job_runs(tmp_path: Path, mode: str) -> None:
    run = f"e2e-elastic-{mode}"
    cfg = load_config(
        ROOT / "configs/tiny_cpu.yaml",
        [
            f"trainer.output_dir={tmp_path}",
            f"trainer.run_name={run}",
            f"trainer.total_steps={MAX_STEPS}",
            "trainer.save_every=0",
            "trainer.rollout_batch_size=6",
            "rollout.max_response_length=24",
            "rollout.num_workers=1",
            "rollout.max_workers=2",
            "cluster.namespace=shuffle-r1-tests",
            "reward.function=tests.e2e.reward_fns:distinct_char_share",
            f"trainer.mode={mode}",  # async: the producer generates while the pool scales
            f"buffer.max_staleness={int(mode == 'async')}",
        ],
    )
    outcomes: list[tuple[int, subprocess.CompletedProcess[str]]] = []

    with Trainer(cfg) as trainer:

        def workers_per_step() -> list[int]:
            rows = read_metrics(trainer.metrics_path) if trainer.metrics_path.exists() else []
            return [int(r["rollout/workers"]) for r in rows]

        def operator() -> None:  # the person at the terminal, while the job runs
            deadline = time.monotonic() + 240

            def wait_until(done: Callable[[list[int]], bool]) -> None:
                while not done(workers_per_step()) and time.monotonic() < deadline:
                    time.sleep(0.2)

            wait_until(lambda used: used.count(1) >= 1)
            outcomes.append((2, scale_command(run, 2)))
            wait_until(lambda used: used.count(2) >= 2)
            outcomes.append((1, scale_command(run, 1)))
            scaled_down = len(workers_per_step())
            wait_until(lambda used: 1 in used[scaled_down:])  # a step on the one worker left
            trainer.stop()  # this step or the next is the last

        hands = threading.Thread(target=operator, daemon=True)
        hands.start()
        summary = trainer.run()
        hands.join(timeout=200)
        refused = subprocess.run(
            [sys.executable, "-m", "services.cli", "scale", "rollout", "3", "--run", run,
             "--address", ray.get_runtime_context().gcs_address,
             "--namespace", "shuffle-r1-tests"],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        ledger = ray.get(trainer.rollout.store.generated.remote("s"))
        workers = trainer.rollout.workers()
        version = trainer.learner.version
        uids = [p.example.uid for p in trainer.train_prompts]

    steps = summary.steps
    assert steps < MAX_STEPS, "the operator did not stop the run"
    for n, done in outcomes:
        assert done.returncode == 0, done.stderr[-2000:]
        assert f"{n} rollout workers running" in done.stdout
    assert refused.returncode == 2 and "outside [rollout.min_workers=1" in refused.stderr

    # every prompt of every step was generated exactly once, by whichever workers ran (in
    # async mode the producer may have generated the step after the last one trained)
    generated = {int(key[1:].partition("/")[0]) for key in ledger}
    ahead = [0, 1] if mode == "async" else [0]
    assert generated in [set(range(steps + a)) for a in ahead], sorted(generated)
    sampler = PromptSampler(len(uids), 6, seed=cfg.data.seed, shuffle=cfg.data.shuffle)
    batches = [sampler.next_batch() for _ in range(len(generated))]
    expected = {f"s{s}/{uids[i]}": 1 for s, batch in enumerate(batches) for i in batch}
    assert ledger == expected
    # the job really ran on 1, then 2, then 1 workers
    used = workers_per_step()
    assert len(used) == steps
    up, down = used.index(2), len(used) - used[::-1].index(2)  # the span on 2 workers
    assert set(used[:up]) == {1} and set(used[up:down]) == {2} and set(used[down:]) == {1}, used
    assert down - up >= 2 and len(used) - down >= 1, used
    # and ends with the newest weights on every worker
    assert len(workers) == 1 and version >= 1
    assert {w["weight_version"] for w in workers} == {version}
