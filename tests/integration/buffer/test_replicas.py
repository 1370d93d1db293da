"""Two servers on one Redis answer alike: a server's in-process payload cache (filled by
its puts) never serves a group that Redis no longer holds in that form."""

from buffer_helpers import make_group, random_groups

from protos import replay_buffer_pb2 as pb


def items(batch):
    return [(i.prompt_id, i.rollout_index, i.rollout.reward, i.advantage) for i in batch.items]


def test_warm_and_cold_servers_return_the_same_batch(start_buffer, run_id):
    a, b = start_buffer(), start_buffer()
    a.client.put_groups(random_groups(run_id, 0, 8))
    warm = a.client.sample(run_id, 0, policy_version=0)  # from a's cache
    cold = b.client.sample(run_id, 0, policy_version=0)  # from Redis
    assert warm.items == cold.items and len(warm.items) > 0


def test_a_dropped_and_rewritten_run_is_not_served_from_the_cache(start_buffer, run_id):
    a, b = start_buffer(), start_buffer()
    first = [make_group(run_id, 0, f"g{i}", [1, 0, 0, 1]) for i in range(3)]
    a.client.put_groups(first)
    assert {i.rollout.reward for i in a.client.sample(run_id, 0, 0).items} == {0.0, 1.0}

    b.client.drop_run(run_id)  # a does not see this call
    second = [make_group(run_id, 0, f"g{i}", [0.75, 0.25, 0.25, 0.25]) for i in range(3)]
    b.client.put_groups(second)
    assert {i.rollout.reward for i in a.client.sample(run_id, 0, 0).items} == {0.25, 0.75}

    b.client.drop_run(run_id)  # the same groups again, under another spec
    b.client.put_groups(second, spec=pb.RunSpec(algorithm="grpo"))
    assert items(a.client.sample(run_id, 0, 0)) == items(b.client.sample(run_id, 0, 0))
    assert len(a.client.sample(run_id, 0, 0).items) == 12  # grpo: every rollout


def test_groups_dropped_as_stale_by_another_server_are_not_served(start_buffer, run_id):
    a, b = start_buffer(), start_buffer()
    a.client.put_groups(random_groups(run_id, 0, 2, weight_version=0))
    a.client.put_groups(random_groups(run_id, 0, 4, weight_version=1, seed=5)[2:])
    assert b.client.sample(run_id, 0, policy_version=1).stale_dropped == 2
    again = a.client.sample(run_id, 0, policy_version=1)
    assert again.groups == 2
    assert {i.prompt_id for i in again.items} <= {"p002", "p003"}
