"""Put → Sample → Stats → DropRun through a real server and Redis: what comes back is
exactly what was put, arranged as docs/algorithm.md §2-§3 say."""

import math

import pytest
import torch
from buffer_helpers import make_group, random_groups, run_keys
from grpc_health.v1 import health_pb2

from protos import replay_buffer_pb2 as pb
from services.replay_buffer.servicer import SERVICE_NAME
from shuffle_r1.algos import advantage_histogram, grpo_advantages, rollout_silence_ratio
from shuffle_r1.config import AlgorithmConfig


def by_key(groups):
    return {(g.step, g.prompt_id): g for g in groups}


def check_items_match_source(items, groups):
    """Every item carries its group's prompt and its own rollout exactly as put."""
    source = by_key(groups)
    for item in items:
        g = source[(item.step, item.prompt_id)]
        assert list(item.prompt_token_ids) == list(g.prompt_token_ids)
        assert item.rollout == g.rollouts[item.rollout_index]


def test_round_trip_shuffle_r1(buffer, run_id):
    groups = random_groups(run_id, step=3, count=6, n=8, seed=1)
    put = buffer.client.put_groups(groups)
    assert list(put.statuses) == [pb.PUT_STATUS_STORED] * 6
    assert (put.stored, put.pairs_kept, put.pairs_dropped) == (6, 6 * 2, 6 * 2)
    assert put.spec.algorithm == "shuffle_r1" and put.spec.shuffle_times == 8

    batch = buffer.client.sample(run_id, step=3, policy_version=0, expected_groups=6)
    assert (batch.groups, batch.pairs_total) == (6, 12)
    assert len(batch.items) == 2 * (12 - batch.shortfall)
    check_items_match_source(batch.items, groups)
    for high, low in zip(batch.items[0::2], batch.items[1::2], strict=True):
        # both rollouts of a pair are adjacent: same group, same pair, high advantage first
        assert (high.prompt_id, high.pair_index) == (low.prompt_id, low.pair_index)
        assert high.rollout_index != low.rollout_index
        assert high.advantage >= low.advantage
        assert high.draw_probability == low.draw_probability > 0
    # each item's advantage is the full-group z-score (§2.4)
    source = by_key(groups)
    for item in batch.items:
        rewards = torch.tensor([[r.reward for r in source[(3, item.prompt_id)].rollouts]])
        expected = grpo_advantages(rewards.double())[0, item.rollout_index].item()
        assert item.advantage == pytest.approx(expected, abs=1e-12)


def test_grpo_keeps_every_rollout_in_order(start_buffer, run_id):
    buffer = start_buffer(algo=AlgorithmConfig(name="grpo"))
    groups = random_groups(run_id, step=0, count=3, n=5, seed=2)  # odd n is fine without PTS
    put = buffer.client.put_groups(groups)
    assert (put.stored, put.pairs_kept, put.pairs_dropped) == (3, 0, 0)
    batch = buffer.client.sample(run_id, 0, policy_version=0)
    assert [(i.prompt_id, i.rollout_index) for i in batch.items] == [
        (g.prompt_id, j) for g in groups for j in range(5)
    ]
    assert {i.draw_probability for i in batch.items} == {1 / 15}
    assert {i.pair_index for i in batch.items} == {-1}
    assert (batch.pairs_total, batch.shortfall, batch.skipped) == (0, 0, False)
    check_items_match_source(batch.items, groups)


def test_grpo_pts_takes_every_kept_pair_once_in_order(buffer, run_id):
    groups = random_groups(run_id, step=0, count=4, n=8, seed=3)
    spec = pb.RunSpec(algorithm="grpo+pts", keep_ratio=0.5)
    buffer.client.put_groups(groups, spec=spec)
    batch = buffer.client.sample(run_id, 0, policy_version=0)
    assert batch.spec.shuffle_times == 1
    assert [i.pair_index for i in batch.items] == [p for p in range(8) for _ in (0, 1)]
    assert batch.shortfall == 0


def test_images_come_back_once_per_group(buffer, run_id):
    images = [pb.Image(data=b"\x89PNG fake"), pb.Image(uri="s3://bucket/fig.png")]
    with_images = make_group(run_id, 0, "a", [1, 0, 0, 1], images=images)
    without = make_group(run_id, 0, "b", [1, 0, 1, 0])
    buffer.client.put_groups([with_images, without])
    batch = buffer.client.sample(run_id, 0, policy_version=0)
    assert set(batch.images) == {"a"}
    assert list(batch.images["a"].images) == images


def test_stats_report_sizes_cursor_and_diagnostics(buffer, run_id):
    groups = random_groups(run_id, step=0, count=5, n=8, seed=4)
    buffer.client.put_groups(groups)
    buffer.client.put_groups(random_groups(run_id, step=1, count=2, n=4, seed=5))
    buffer.client.sample(run_id, 0, policy_version=0)

    stats = buffer.client.stats(run_id, step=0, histogram_bins=12)
    assert [(s.step, s.groups_stored, s.rollouts_put, s.rollouts_stored, s.pairs_kept)
            for s in stats.steps] == [(0, 5, 40, 20, 10), (1, 2, 8, 4, 2)]  # fmt: skip
    assert all(s.bytes > 0 for s in stats.steps)
    assert (stats.cursor.last_sampled_step, stats.cursor.samples_served) == (0, 1)
    assert (stats.counters.groups_stored, stats.counters.pairs_kept) == (7, 12)
    # the diagnostics equal the library's on the same rollouts (before PTS)
    rewards = torch.tensor([[r.reward for r in g.rollouts] for g in groups], dtype=torch.float64)
    advantages = grpo_advantages(rewards).flatten()
    truncated = torch.tensor([r.truncated for g in groups for r in g.rollouts])
    counts, edges = advantage_histogram(advantages, bins=12)
    assert stats.diagnostics_step == 0
    assert list(stats.histogram_counts) == counts.tolist()
    assert list(stats.histogram_edges) == edges.tolist()
    assert stats.rollout_silence_ratio == pytest.approx(
        rollout_silence_ratio(advantages, truncated)
    )
    assert buffer.client.stats(run_id).diagnostics_step == 1  # default: the newest step


def test_drop_run_deletes_every_key(buffer, run_id, redis_client):
    buffer.client.put_groups(random_groups(run_id, step=0, count=3))
    buffer.client.sample(run_id, 0, policy_version=0)
    assert run_keys(redis_client, run_id)
    dropped = buffer.client.drop_run(run_id)
    assert (dropped.existed, dropped.groups_deleted) == (True, 3)
    assert run_keys(redis_client, run_id) == []
    assert buffer.client.drop_run(run_id).existed is False


def test_health_and_metrics(buffer, run_id):
    assert buffer.client.health() == health_pb2.HealthCheckResponse.SERVING
    assert buffer.client.health(SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    groups = random_groups(run_id, step=0, count=4, n=8)
    buffer.client.put_groups(groups)
    buffer.client.put_groups(groups)
    batch = buffer.client.sample(run_id, 0, policy_version=0)
    m = buffer.metric
    assert m("shuffle_r1_buffer_groups_put_total", outcome="stored") == 4
    assert m("shuffle_r1_buffer_groups_put_total", outcome="duplicate") == 4
    assert m("shuffle_r1_buffer_pairs_kept_total") == 8
    assert m("shuffle_r1_buffer_pairs_dropped_total") == 8
    assert m("shuffle_r1_buffer_samples_total") == 1
    assert m("shuffle_r1_buffer_items_sampled_total") == len(batch.items)
    assert m("shuffle_r1_buffer_requests_total", method="PutGroups", code="OK") == 2
    assert m("shuffle_r1_buffer_request_seconds_count", method="Sample") == 1
    assert m("shuffle_r1_buffer_rollout_silence_ratio") == pytest.approx(
        batch.rollout_silence_ratio
    )
    assert not math.isnan(batch.rollout_silence_ratio)
