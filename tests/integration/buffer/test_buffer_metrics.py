"""The buffer's Prometheus endpoint, scraped over HTTP: every ``role == "buffer"`` metric of
the catalog is there under its exact name, with the values the calls imply."""

from __future__ import annotations

import math

from buffer_helpers import metric_samples, random_groups, scrape

from shuffle_r1.metric_catalog import by_role
from shuffle_r1.net import free_port


def value(scraped, name: str, **labels: str) -> float:
    return scraped[(name, frozenset(labels.items()))]


def test_every_buffer_metric_is_exported_with_a_plausible_value(start_buffer, run_id):
    buffer = start_buffer(metrics_port=free_port(), keep_steps=2, max_staleness=0)
    n, count = 8, 5  # rollouts per group, groups per step
    kept_pairs = count * math.floor(0.5 * n / 2)  # α = 0.5 (the default recipe)
    for step in range(3):  # the third put evicts step 0 (keep_steps=2)
        assert buffer.client.put_groups(random_groups(run_id, step, count, n=n)).stored == count
    batch = buffer.client.sample(run_id, 2, policy_version=0, expected_groups=count)
    stats = buffer.client.stats(run_id)
    scraped = metric_samples(scrape(buffer.cfg.metrics_port))

    for spec in by_role("buffer"):  # every catalog entry, under exactly its name
        for series in spec.series:
            found = [labels for name, labels in scraped if name == series]
            assert found, f"{series} is not exported"
            assert all({k for k, _ in labels} >= set(spec.labels) for labels in found), series
    assert value(scraped, "shuffle_r1_buffer_requests_total", method="PutGroups", code="OK") == 3
    assert value(scraped, "shuffle_r1_buffer_requests_total", method="Sample", code="OK") == 1
    assert value(scraped, "shuffle_r1_buffer_request_seconds_count", method="PutGroups") == 3
    assert 0 < value(scraped, "shuffle_r1_buffer_request_seconds_sum", method="Sample") < 10
    assert value(scraped, "shuffle_r1_buffer_groups_put_total", outcome="stored") == 3 * count
    assert value(scraped, "shuffle_r1_buffer_pairs_kept_total") == 3 * kept_pairs
    assert value(scraped, "shuffle_r1_buffer_pairs_dropped_total") == 3 * (
        count * n // 2 - kept_pairs
    )
    assert value(scraped, "shuffle_r1_buffer_stale_dropped_total", where="put") == 0
    assert value(scraped, "shuffle_r1_buffer_evicted_steps_total") == 1
    assert value(scraped, "shuffle_r1_buffer_evicted_groups_total") == count
    assert value(scraped, "shuffle_r1_buffer_samples_total") == 1
    assert value(scraped, "shuffle_r1_buffer_items_sampled_total") == len(batch.items) > 0
    assert value(scraped, "shuffle_r1_buffer_abs_shortfall_total") == batch.shortfall
    assert value(scraped, "shuffle_r1_buffer_skipped_batches_total") == 0
    assert value(scraped, "shuffle_r1_buffer_redis_errors_total", op="Sample") == 0
    assert value(scraped, "shuffle_r1_buffer_rollout_silence_ratio") == batch.rollout_silence_ratio
    assert value(scraped, "shuffle_r1_buffer_advantage_collapse_share") == (
        batch.advantage_collapse_share
    )
    # the stored sizes: two steps held, as Stats reads them from Redis
    assert (
        value(scraped, "shuffle_r1_buffer_groups_stored", run=run_id)
        == 2 * count
        == sum(s.groups_stored for s in stats.steps)
    )
    assert (
        value(scraped, "shuffle_r1_buffer_rollouts_stored", run=run_id)
        == 4 * kept_pairs
        == sum(s.rollouts_stored for s in stats.steps)
    )

    # a sample for a newer policy drops step 1's groups as stale; a drop removes the run
    buffer.client.sample(run_id, 1, policy_version=1)
    scraped = metric_samples(scrape(buffer.cfg.metrics_port))
    assert value(scraped, "shuffle_r1_buffer_stale_dropped_total", where="sample") == count
    assert value(scraped, "shuffle_r1_buffer_groups_stored", run=run_id) == count
    assert value(scraped, "shuffle_r1_buffer_rollouts_stored", run=run_id) == 2 * kept_pairs
    buffer.client.drop_run(run_id)
    scraped = metric_samples(scrape(buffer.cfg.metrics_port))
    assert ("shuffle_r1_buffer_groups_stored", frozenset({("run", run_id)})) not in scraped


def test_the_metrics_endpoint_stops_with_the_server(start_buffer):
    port = free_port()
    buffer = start_buffer(metrics_port=port, health_check_s=0.1)
    assert "shuffle_r1_buffer_samples_total" in scrape(port)
    buffer.server.stop(0).wait()
    second = start_buffer(metrics_port=port)  # the port is free again
    assert "shuffle_r1_buffer_samples_total" in scrape(port)
    second.server.stop(0).wait()
