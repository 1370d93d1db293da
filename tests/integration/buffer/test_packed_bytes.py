"""Token ids and log-probs stay packed bytes on the buffer's put and sample paths (issue
#17 item 5): the fragments the server cuts from a group's bytes are exactly what protobuf
itself writes, and the numpy checks on those bytes find the same first bad value, with the
same message, as a check value by value."""

from __future__ import annotations

import hashlib
import math

import grpc
import pytest
from buffer_helpers import make_group, random_groups

from protos import replay_buffer_pb2 as pb
from services.replay_buffer import logic, wire
from services.replay_buffer.client import item_prompts
from shuffle_r1.config import AlgorithmConfig


def edge_groups(run_id: str) -> list[pb.Group]:
    """Groups at the encodings' edges: step 0 (left out of the bytes) and a large step, a
    prompt id outside ASCII, ids up to 2**32 - 1, equal rewards (advantages 0.0, left out),
    weight version 0, truncated rollouts, images, with and without log-probs."""
    groups = random_groups(run_id, 0, 3, n=8, seed=5)
    groups += random_groups(run_id, 2**40, 2, n=8, seed=6)
    groups[3].prompt_id, groups[4].prompt_id = "p003", "p004"
    groups[1].prompt_id = "pr\N{GREEK SMALL LETTER ALPHA}mpt"
    groups[1].prompt_token_ids.append(2**32 - 1)
    groups[1].rollouts[3].token_ids.append(2**32 - 1)
    groups[1].rollouts[3].logprobs.append(-0.0)
    for r in groups[2].rollouts:
        r.reward = 0.5
    groups[3].images.add(data=b"\x89PNG")
    groups[3].images.add(uri="s3://bucket/image.png")
    for r in groups[4].rollouts:
        r.ClearField("logprobs")
        r.weight_version = 12
    return groups


@pytest.mark.parametrize("algorithm", ["grpo", "grpo+pts", "shuffle_r1"])
def test_fragments_are_what_protobuf_writes(algorithm):
    groups = edge_groups("packed")
    spec = logic.resolve_spec(pb.RunSpec(algorithm=algorithm), AlgorithmConfig(), "packed")
    records = logic.prepare_groups(groups, spec)
    for g, record in zip(groups, records, strict=True):
        summary = pb.GroupSummary.FromString(record.summary)
        stored = pb.StoredGroup.FromString(record.payload)
        head = pb.SampledItem(
            step=g.step, prompt_id=g.prompt_id, prompt_token_ids=g.prompt_token_ids
        )
        assert stored.item_head == head.SerializeToString()
        assert list(stored.item_bodies) == [
            pb.SampledItem(
                rollout_index=j, rollout=g.rollouts[j], advantage=summary.advantages[j]
            ).SerializeToString()
            for j in summary.kept
        ]
        assert list(stored.images) == list(g.images)
        assert record.digest == hashlib.sha256(g.SerializeToString(deterministic=True)).digest()
    assert 0.0 in pb.GroupSummary.FromString(records[2].summary).advantages  # left out


@pytest.mark.parametrize(
    ("pair_index", "probability"),
    [(0, 0.0), (0, -0.0), (-1, 1 / 3), (5, 0.25), (2**31 - 1, 1e-300), (7, math.nan),
     (3, math.inf), (200, 5e-324)],
)  # fmt: skip
def test_item_tails_are_what_protobuf_writes(pair_index, probability):
    expected = pb.SampledItem(pair_index=pair_index, draw_probability=probability)
    assert wire.item_tail(pair_index, probability) == expected.SerializeToString()


def test_a_sampled_batch_carries_the_groups_as_put(buffer, run_id):
    """Through the server: every item's prompt and rollout are the put group's, log-probs
    included when the run keeps them."""
    groups = edge_groups(run_id)[:4]  # those with log-probs, put as one step
    for g in groups:
        g.step = 3
    assert buffer.client.put_groups(groups).stored == 4
    batch = buffer.client.sample(run_id, 3, policy_version=0, expected_groups=4)
    by_id = {g.prompt_id: g for g in groups}
    assert batch.items
    for item in batch.items:
        g = by_id[item.prompt_id]
        assert (item.step, list(item.prompt_token_ids)) == (3, list(g.prompt_token_ids))
        assert item.rollout == g.rollouts[item.rollout_index]


def test_a_head_split_for_prompts_by_group_is_what_protobuf_writes():
    for g in edge_groups("split"):
        full = pb.SampledItem(
            step=g.step, prompt_id=g.prompt_id, prompt_token_ids=g.prompt_token_ids
        )
        short, entry = wire.split_item_head(full.SerializeToString())
        assert short == pb.SampledItem(step=g.step, prompt_id=g.prompt_id).SerializeToString()
        response = pb.SampleResponse()
        response.prompts[g.prompt_id].token_ids[:] = g.prompt_token_ids
        assert entry == response.SerializeToString(deterministic=True)


@pytest.mark.parametrize("algorithm", ["grpo", "shuffle_r1"])
def test_prompts_by_group_send_each_prompt_once_and_the_same_batch(buffer, run_id, algorithm):
    """The same draw either way; per group, the prompt comes once and the items carry none,
    and client.item_prompts gives every item its prompt back."""
    groups = random_groups(run_id, 5, 4, n=8, seed=9)
    spec = pb.RunSpec(algorithm=algorithm)
    assert buffer.client.put_groups(groups, spec=spec).stored == 4
    per_item = buffer.client.sample(run_id, 5, policy_version=0, spec=spec)
    by_group = buffer.client.sample(run_id, 5, policy_version=0, spec=spec, prompts_by_group=True)
    assert len(by_group.items) == len(per_item.items) > 0
    assert not any(item.prompt_token_ids for item in by_group.items)
    drawn = {item.prompt_id for item in per_item.items}
    assert set(by_group.prompts) == drawn
    for a, b in zip(per_item.items, by_group.items, strict=True):
        b_full = pb.SampledItem()
        b_full.CopyFrom(b)
        b_full.prompt_token_ids[:] = by_group.prompts[b.prompt_id].token_ids
        assert b_full == a
    assert item_prompts(by_group) == item_prompts(per_item)
    assert item_prompts(per_item) == [list(i.prompt_token_ids) for i in per_item.items]
    assert by_group.ByteSize() < per_item.ByteSize()
    del by_group.prompts[next(iter(drawn))]
    with pytest.raises(ValueError, match="has no prompt for group"):
        item_prompts(by_group)


def big_group(run_id: str, prompt_id: str, tokens: int) -> pb.Group:
    g = make_group(run_id, 0, prompt_id, [1, 0, 0, 1, 1, 0, 0, 1])
    g.prompt_token_ids[:] = [1, 2, 3, 4, 5, 6]
    for j, r in enumerate(g.rollouts):
        r.token_ids[:] = [(7 * t + j) % 1000 for t in range(tokens)]
        r.logprobs[:] = [-0.25] * tokens
    return g


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda g: g[2].rollouts[7].token_ids.__setitem__(-1, 1000),
         "groups[2].rollouts[7].token_ids[299] is 1000, outside the vocabulary [0, 1000)"),
        (lambda g: g[1].prompt_token_ids.append(4000),
         "groups[1].prompt_token_ids[6] is 4000, outside the vocabulary [0, 1000)"),
        (lambda g: g[2].rollouts[5].logprobs.__setitem__(150, math.nan),
         "groups[2].rollouts[5].logprobs[150] is nan; log-probs must be finite"),
        (lambda g: g[1].rollouts[0].logprobs.__setitem__(299, 2e-4),
         "groups[1].rollouts[0].logprobs[299] is 0.00019999999494757503; log-probabilities "
         "must be <= 0"),
        # the float32 next above MAX_LOGPROB (1e-4): refused, as before
        (lambda g: g[0].rollouts[3].logprobs.__setitem__(0, 1.0000001e-4),
         "groups[0].rollouts[3].logprobs[0] is 0.00010000001202570274"),
    ],
)  # fmt: skip
def test_a_bad_value_deep_in_a_big_put_is_named(buffer, run_id, change, message):
    groups = [big_group(run_id, f"p{i}", 300) for i in range(3)]
    change(groups)
    with pytest.raises(grpc.RpcError) as info:
        buffer.client.put_groups(groups, spec=pb.RunSpec(vocab_size=1000))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    groups = [big_group(run_id, f"p{i}", 300) for i in range(3)]  # the same, unchanged
    groups[0].rollouts[3].logprobs[0] = 1e-4  # MAX_LOGPROB itself is allowed (float32)
    assert buffer.client.put_groups(groups, spec=pb.RunSpec(vocab_size=1000)).stored == 3
