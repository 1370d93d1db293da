"""What a put carries and answers, through a real server and Redis (issue #18, item 7):
rollout log-probs are stored only under ``RunSpec.logprobs = LOGPROBS_REQUIRED`` (and the
sampled ones become the learner's behaviour log-probs, issue #21), and the put answers the
GRPO advantages it computed, so the trainer does not compute them again."""

import grpc
import pytest
import torch
from buffer_helpers import random_groups, run_keys

from protos import replay_buffer_pb2 as pb
from services.trainer.records import train_batch
from shuffle_r1.algos import grpo_advantages


def without_logprobs(groups):
    for g in groups:
        for r in g.rollouts:
            r.ClearField("logprobs")
    return groups


def test_omitted_logprobs_are_neither_stored_nor_sampled(buffer, run_id):
    spec = pb.RunSpec(algorithm="shuffle_r1", logprobs=pb.LOGPROBS_OMITTED)
    groups = without_logprobs(random_groups(run_id, step=0, count=4, n=8, seed=3))
    put = buffer.client.put_groups(groups, spec=spec)
    assert put.stored == 4 and put.spec.logprobs == pb.LOGPROBS_OMITTED
    batch = buffer.client.sample(run_id, step=0, policy_version=0, expected_groups=4, spec=spec)
    assert batch.items
    source = {(g.step, g.prompt_id): g for g in groups}
    for item in batch.items:
        assert not item.rollout.logprobs
        assert item.rollout == source[(item.step, item.prompt_id)].rollouts[item.rollout_index]


def test_sampled_bytes_shrink_without_logprobs(start_buffer, run_id):
    """The same groups and draw, with and without log-probs: the batch is smaller by the
    log-probs' bytes (4 per response token and their field headers)."""
    sizes = {}
    server = start_buffer()
    for policy in (pb.LOGPROBS_REQUIRED, pb.LOGPROBS_OMITTED):
        groups = random_groups(run_id, step=0, count=8, n=8, seed=5)
        if policy == pb.LOGPROBS_OMITTED:
            without_logprobs(groups)
        spec = pb.RunSpec(algorithm="shuffle_r1", seed=9, logprobs=policy)
        server.client.put_groups(groups, spec=spec)
        batch = server.client.sample(run_id, 0, 0, expected_groups=8, spec=spec)
        sizes[policy] = (batch.ByteSize(), sum(len(it.rollout.token_ids) for it in batch.items))
        server.client.drop_run(run_id)
    (full, tokens), (lean, same_tokens) = sizes[pb.LOGPROBS_REQUIRED], sizes[pb.LOGPROBS_OMITTED]
    assert tokens == same_tokens  # the same draw
    assert full - lean >= 4 * tokens


def test_sampled_logprobs_become_the_behaviour_logprobs(buffer, run_id):
    """The learner's off-policy batch from a real draw (docs/algorithm.md §4): row i holds
    item i's stored sampling log-probs as put (float32, as the wire carries them), then 0."""
    spec = pb.RunSpec(algorithm="shuffle_r1", logprobs=pb.LOGPROBS_REQUIRED)
    groups = random_groups(run_id, step=0, count=4, n=8, seed=11)
    buffer.client.put_groups(groups, spec=spec)
    sample = buffer.client.sample(run_id, step=0, policy_version=0, expected_groups=4, spec=spec)
    batch, _ = train_batch(sample, behaviour=True)
    source = {(g.step, g.prompt_id): g for g in groups}
    assert batch.behaviour_logprobs is not None and len(batch) == len(sample.items) > 0
    lengths = {len(r) for r in batch.response_token_ids}
    assert batch.behaviour_logprobs.shape == (len(batch), max(lengths)) and len(lengths) > 1
    for row, item in zip(batch.behaviour_logprobs, sample.items, strict=True):
        put = source[(item.step, item.prompt_id)].rollouts[item.rollout_index].logprobs
        want = torch.tensor(list(put), dtype=torch.float32)
        assert torch.equal(row[: len(put)], want) and not row[len(put) :].any()


@pytest.mark.parametrize(
    ("policy", "carry", "message"),
    [
        (pb.LOGPROBS_REQUIRED, False, "groups[0].rollouts[0].logprobs is empty"),
        (pb.LOGPROBS_OMITTED, True, "groups[0].rollouts[0].logprobs has"),
    ],
)
def test_logprobs_against_the_spec_are_refused(
    buffer, run_id, redis_client, policy, carry, message
):
    groups = random_groups(run_id, step=0, count=2, n=8, seed=4)
    if not carry:
        without_logprobs(groups)
    with pytest.raises(grpc.RpcError) as err:
        buffer.client.put_groups(groups, spec=pb.RunSpec(logprobs=policy))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()
    assert run_keys(redis_client, run_id) == []  # nothing stored


def test_put_answers_the_grpo_advantages_of_every_rollout(buffer, run_id):
    groups = random_groups(run_id, step=2, count=5, n=8, seed=7)
    rewards = torch.tensor([[r.reward for r in g.rollouts] for g in groups], dtype=torch.float64)
    expected = grpo_advantages(rewards).flatten().tolist()
    put = buffer.client.put_groups(groups)
    assert list(put.advantages) == pytest.approx(expected, abs=1e-12)
    again = buffer.client.put_groups(groups)  # a retry: every group a duplicate
    assert list(again.statuses) == [pb.PUT_STATUS_DUPLICATE] * 5
    assert list(again.advantages) == list(put.advantages)
