"""Every metric of the catalog is exported by the role that owns it, with a plausible value:
the real endpoints (the trainer's and the buffer's prometheus-client exporters, the Ray
metrics agent for the rollout, reward and learner workers) are scraped over HTTP during a
tiny run, after its steps and its evaluations, while every role is still up."""

from __future__ import annotations

import math
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.trainer.loop import Trainer
from shuffle_r1.config import load_config
from shuffle_r1.metric_catalog import CATALOG, RAY_ROLES, spec_of_series
from shuffle_r1.net import free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]
STEPS = 3
EVALS = 2  # before the first update (trainer.val_before_train) and after step 3
RUN = "e2e-metrics"

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Samples:
    """Samples by catalog series name (Ray's ``ray_`` prefix removed)."""
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            spec = spec_of_series(sample.name)
            if spec is not None:
                name = sample.name.removeprefix("ray_")
                out[name].append((dict(sample.labels), float(sample.value)))
    return out


def values(samples: Samples, name: str, **labels: str) -> list[float]:
    return [
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    ]


def test_every_catalog_metric_is_exported_with_a_plausible_value(
    tmp_path: Path, ray_metrics_url: str
) -> None:
    trainer_port, buffer_port = free_port(), free_port()
    cfg = load_config(
        ROOT / "configs/tiny_cpu.yaml",
        [
            f"trainer.output_dir={tmp_path}",
            f"trainer.run_name={RUN}",
            f"trainer.total_steps={STEPS}",
            "trainer.eval_every=3",
            "trainer.save_every=0",
            f"trainer.metrics_port={trainer_port}",
            f"buffer.metrics_port={buffer_port}",
            "reward.function=tests.e2e.reward_fns:distinct_char_share_some_raise",
        ],
    )
    with Trainer(cfg) as trainer:
        trainer.run()
        endpoints = {
            "trainer": f"http://127.0.0.1:{trainer_port}/metrics",
            "buffer": f"http://127.0.0.1:{buffer_port}/metrics",
        }
        scraped = {role: scrape(url) for role, url in endpoints.items()}
        # Ray's agent reports every second (tests/conftest.py); give it a few rounds
        deadline = time.monotonic() + 60
        wanted = {s for m in CATALOG if m.role in RAY_ROLES for s in m.series}
        # ... until every worker counter includes the last evaluation too: the rollout and
        # reward workers report on their own clocks, so one can lag the other by a round
        totals = {
            "shuffle_r1_rollout_worker_requests_total": STEPS * cfg.trainer.rollout_batch_size
            + EVALS * len(trainer.val_prompts),
            "shuffle_r1_reward_worker_scored_total": STEPS
            * cfg.trainer.rollout_batch_size
            * cfg.rollout.n
            + EVALS * len(trainer.val_prompts) * cfg.rollout.val_n,
        }
        while True:
            ray_samples = scrape(ray_metrics_url)
            counted = {
                name: sum(v for lab, v in ray_samples.get(name, []) if lab.get("run") == RUN)
                for name in totals
            }
            done = wanted <= set(ray_samples) and all(
                counted[name] >= total for name, total in totals.items()
            )
            if done or time.monotonic() > deadline:
                break
            time.sleep(1)
        version = trainer.learner.version

    exported: Samples = defaultdict(list)
    for samples in (*scraped.values(), ray_samples):
        for name, rows in samples.items():
            exported[name] += rows
    missing = [s for m in CATALOG for s in m.series if s not in exported]
    assert not missing, f"catalog metrics not exported: {missing}"
    for m in CATALOG:  # each role exports its own metrics and nobody else's
        source = ray_samples if m.role in RAY_ROLES else scraped[m.role]
        assert m.series[0] in source, f"{m.name} is not exported by the {m.role} role"
    for name, rows in exported.items():
        assert all(math.isfinite(v) for _, v in rows), (name, rows)
    # the session's Ray keeps exporting what earlier tests' workers counted: keep this run's
    for m in CATALOG:
        if m.role in RAY_ROLES:
            for series in m.series:
                exported[series] = [r for r in exported[series] if r[0].get("run") == RUN]

    e = exported
    # the trainer
    assert values(e, "shuffle_r1_trainer_step") == [STEPS]
    assert values(e, "shuffle_r1_weight_version") == [version] and version >= 1
    assert values(e, "shuffle_r1_step_seconds_count") == [STEPS]
    for phase in ("generate", "reward", "buffer", "old_logprobs", "update", "publish"):
        assert values(e, "shuffle_r1_phase_seconds_count", phase=phase) == [STEPS], phase
    assert values(e, "shuffle_r1_phase_seconds_count", phase="eval") == [EVALS]
    assert values(e, "shuffle_r1_phase_seconds_sum", phase="generate")[0] > 0
    expected_rollouts = STEPS * cfg.trainer.rollout_batch_size * cfg.rollout.n
    assert values(e, "shuffle_r1_advantage_count") == [expected_rollouts]
    assert values(e, "shuffle_r1_rollout_tokens_total")[0] == (
        expected_rollouts * cfg.rollout.max_response_length  # the random model never stops
    )
    assert values(e, "shuffle_r1_rollout_tokens_per_second")[0] > 0
    assert values(e, "shuffle_r1_rollout_queue_depth") == [0]  # nothing in flight now
    for name in ("shuffle_r1_reward_mean", "shuffle_r1_reward_accuracy"):
        for split in ("train", "val"):
            assert all(0 <= v <= 1 for v in values(e, name, split=split)), (name, split)
            assert values(e, name, split=split), (name, split)
    for stage in ("before_pts", "after_abs"):
        assert 0 <= values(e, "shuffle_r1_advantage_collapse_share", stage=stage)[0] <= 1
    assert 0 <= values(e, "shuffle_r1_rollout_silence_ratio")[0] <= 1
    kept = (
        STEPS * cfg.trainer.rollout_batch_size * int(cfg.algorithm.keep_ratio * cfg.rollout.n / 2)
    )
    assert values(e, "shuffle_r1_pts_pairs_kept_total") == [kept]
    assert values(e, "shuffle_r1_buffer_pairs_kept_total") == [kept]
    drawn = values(e, "shuffle_r1_abs_pairs_drawn_total")[0]
    assert 0 < drawn <= kept
    assert values(e, "shuffle_r1_abs_pair_draws_count") == [kept]  # one observation per pair
    assert values(e, "shuffle_r1_abs_pair_draws_sum") == [drawn]
    assert values(e, "shuffle_r1_live_workers", role="rollout") == [1]
    assert values(e, "shuffle_r1_live_workers", role="reward") == [1]
    assert values(e, "shuffle_r1_live_workers", role="learner") == [2]
    raised = values(e, "shuffle_r1_errors_total", role="reward", kind="raised")[0]
    assert raised > 0  # the reward function raises for about a quarter of the responses
    assert values(e, "shuffle_r1_weight_sync_seconds_count") == [STEPS]
    assert values(e, "shuffle_r1_learner_grad_norm")[0] > 0
    assert 0 < values(e, "shuffle_r1_learner_positions_per_token")[0] < 2
    assert values(e, "shuffle_r1_learner_peak_memory_bytes")[0] > 2**20  # a rank's RSS peak
    # a synchronous run carries no behaviour log-probs: the decoupled loss's neutral values
    assert values(e, "shuffle_r1_learner_behaviour_imp_weight") == [1.0]
    assert values(e, "shuffle_r1_learner_behaviour_truncated_fraction") == [0.0]
    # and its rollouts are never stale; each side idles while the other works
    assert values(e, "shuffle_r1_rollout_staleness_count") == [expected_rollouts]
    assert values(e, "shuffle_r1_rollout_staleness_sum") == [0]
    for side in ("producer", "consumer"):
        assert values(e, "shuffle_r1_idle_seconds_total", side=side)[0] > 0, side
    # the buffer
    assert values(e, "shuffle_r1_buffer_groups_stored", run=RUN)[0] > 0
    assert values(e, "shuffle_r1_buffer_samples_total") == [STEPS]
    # the workers, through Ray
    generated = sum(values(e, "shuffle_r1_rollout_worker_requests_total"))
    assert generated == STEPS * cfg.trainer.rollout_batch_size + EVALS * len(trainer.val_prompts)
    assert set(values(e, "shuffle_r1_rollout_worker_weight_version")) == {version}
    assert (
        sum(values(e, "shuffle_r1_reward_worker_scored_total"))
        == expected_rollouts + EVALS * len(trainer.val_prompts) * cfg.rollout.val_n
    )
    assert sum(values(e, "shuffle_r1_reward_worker_errors_total", kind="raised")) == raised
    ranks = {lab["rank"] for lab, _ in e["shuffle_r1_learner_worker_step_seconds_count"]}
    assert ranks == {"0", "1"}
    assert sum(values(e, "shuffle_r1_learner_worker_tokens_total")) > 0
