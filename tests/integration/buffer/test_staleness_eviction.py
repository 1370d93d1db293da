"""Staleness (groups older than the bound are dropped and counted, at put and at sample),
eviction (the newest keep_steps steps are kept) and the expected-groups check."""

import grpc
import pytest
from buffer_helpers import random_groups, run_keys

from protos import replay_buffer_pb2 as pb


def test_stale_groups_are_dropped_at_put(start_buffer, run_id):
    buffer = start_buffer(max_staleness=1)
    buffer.client.put_groups(random_groups(run_id, 0, 2, weight_version=5))
    fresh = random_groups(run_id, 1, 2, weight_version=4)  # 5 - 1: within the bound
    stale = random_groups(run_id, 1, 4, weight_version=3, seed=9)[2:]
    response = buffer.client.put_groups(fresh + stale)
    assert list(response.statuses) == [pb.PUT_STATUS_STORED] * 2 + [pb.PUT_STATUS_STALE] * 2
    assert (response.stored, response.stale) == (2, 2)
    stats = buffer.client.stats(run_id)
    assert stats.counters.stale_at_put == 2
    assert stats.steps[1].groups_stored == 2
    assert buffer.metric("shuffle_r1_buffer_stale_dropped_total", where="put") == 2
    assert buffer.metric("shuffle_r1_buffer_groups_put_total", outcome="stale") == 2


def test_newest_version_of_the_request_counts(buffer, run_id):
    # strictly on-policy: a group of version 1 is stale once a version-2 group is seen
    old = random_groups(run_id, 0, 1, weight_version=1)
    new = random_groups(run_id, 0, 2, weight_version=2, seed=3)[1:]
    response = buffer.client.put_groups(old + new)
    assert list(response.statuses) == [pb.PUT_STATUS_STALE, pb.PUT_STATUS_STORED]


def test_stale_groups_are_dropped_at_sample(buffer, run_id, redis_client):
    buffer.client.put_groups(random_groups(run_id, 0, 3, weight_version=0))
    buffer.client.put_groups(random_groups(run_id, 1, 2, weight_version=0))
    on_policy = buffer.client.sample(run_id, 0, policy_version=0, expected_groups=3)
    assert (on_policy.groups, on_policy.stale_dropped) == (3, 0)

    later = buffer.client.sample(run_id, 1, policy_version=1, expected_groups=2)
    assert (later.groups, later.stale_dropped, len(later.items), later.skipped) == (0, 2, 0, True)
    stats = buffer.client.stats(run_id)
    assert stats.counters.stale_at_sample == 2
    assert [(s.step, s.groups_stored, s.groups_accepted) for s in stats.steps] == [
        (0, 3, 3),
        (1, 0, 2),  # dropped, but still accepted: the expected-groups check passes
    ]
    assert buffer.metric("shuffle_r1_buffer_stale_dropped_total", where="sample") == 2
    # the same sample again: nothing more to drop, the same (empty) batch
    again = buffer.client.sample(run_id, 1, policy_version=1, expected_groups=2)
    assert (again.stale_dropped, len(again.items)) == (0, 0)
    # a retried put of a dropped group stays a duplicate: it is not stored again
    retry = buffer.client.put_groups(random_groups(run_id, 1, 2, weight_version=0))
    assert list(retry.statuses) == [pb.PUT_STATUS_DUPLICATE] * 2


def test_old_steps_are_evicted_and_counted(start_buffer, run_id, redis_client):
    buffer = start_buffer(keep_steps=2)
    for step in range(4):
        response = buffer.client.put_groups(random_groups(run_id, step, 3, seed=step))
        assert response.evicted_steps == (1 if step >= 2 else 0)
    stats = buffer.client.stats(run_id)
    assert [s.step for s in stats.steps] == [2, 3]
    assert (stats.counters.evicted_steps, stats.counters.evicted_groups) == (2, 6)
    assert buffer.metric("shuffle_r1_buffer_evicted_steps_total") == 2
    assert buffer.metric("shuffle_r1_buffer_evicted_groups_total") == 6
    # no key of an evicted step remains: memory is bounded
    assert not [k for k in run_keys(redis_client, run_id) if b":step:0:" in k or b":step:1:" in k]

    with pytest.raises(grpc.RpcError) as info:
        buffer.client.sample(run_id, 1, policy_version=0)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "step 1" in info.value.details() and "keep_steps=2" in info.value.details()

    # a late put for an evicted step, or one older than every held step, is dropped
    late = buffer.client.put_groups(random_groups(run_id, 0, 1, seed=11))
    assert list(late.statuses) == [pb.PUT_STATUS_EVICTED]
    assert [s.step for s in buffer.client.stats(run_id).steps] == [2, 3]


def test_expected_groups_detects_lost_groups(buffer, run_id, redis_client):
    buffer.client.put_groups(random_groups(run_id, 0, 4))
    assert buffer.client.sample(run_id, 0, 0, expected_groups=4).groups == 4
    # simulate a partial loss (e.g. Redis restarted from an old snapshot)
    prefix = f"shuffle_r1:buffer:{{{run_id}}}:step:0:"
    for name in ("groups", "summary", "digest", "wv", "kept"):
        redis_client.hdel(prefix + name, "p001")
    with pytest.raises(grpc.RpcError) as info:
        buffer.client.sample(run_id, 0, 0, expected_groups=4)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "holds 3 groups of step 0 but the trainer expects 4" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        buffer.client.sample(run_id, 7, 0, expected_groups=4)  # a step that lost everything
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
