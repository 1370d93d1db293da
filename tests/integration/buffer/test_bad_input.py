"""Bad input is answered with the fitting status and a message naming the field; the
server stays up and nothing stored changes."""

import grpc
import pytest
from buffer_helpers import field, make_group, random_groups
from grpc_health.v1 import health_pb2

from protos import replay_buffer_pb2 as pb

PUT = "/shuffle_r1.buffer.v1.ReplayBuffer/PutGroups"


def put_bytes(group: bytes) -> bytes:
    return field(1, group)  # PutGroupsRequest.groups


def mutate(run_id, change):
    groups = [make_group(run_id, 0, "x", [1, 0, 0, 1]), make_group(run_id, 0, "y", [0, 1, 1, 0])]
    change(groups)
    return pb.PutGroupsRequest(groups=groups)


def set_reward(g, value):
    g[0].rollouts[3].reward = value


def set_logprob(g, value):
    g[0].rollouts[0].logprobs.append(value)
    g[0].rollouts[0].token_ids.append(7)


BAD_PUTS = [
    ("empty groups", lambda g: g.clear(), "groups is empty"),
    ("empty rollouts", lambda g: g[0].ClearField("rollouts"), "groups[0].rollouts is empty"),
    ("mismatched lengths", lambda g: g[1].rollouts[2].logprobs.append(-1.0),
     "groups[1].rollouts[2].logprobs has"),
    ("nan reward", lambda g: set_reward(g, float("nan")), "groups[0].rollouts[3].reward is nan"),
    ("inf reward", lambda g: set_reward(g, float("inf")), "groups[0].rollouts[3].reward is inf"),
    ("huge reward", lambda g: set_reward(g, 1e308),
     "groups[0].rollouts[3].reward is 1e+308; rewards must be in [-1e+06, 1e+06]"),
    ("reward below the bound", lambda g: set_reward(g, -1.5e6),
     "groups[0].rollouts[3].reward is -1500000.0; rewards must be in"),
    ("positive log-prob", lambda g: set_logprob(g, 0.5),
     "is 0.5; log-probabilities must be <= 0 (up to 0.0001 of rounding)"),
    ("nan logprob", lambda g: set_logprob(g, float("nan")), "groups[0].rollouts[0].logprobs["),
    ("empty response", lambda g: (g[0].rollouts[1].ClearField("token_ids"),
                                  g[0].rollouts[1].ClearField("logprobs")),
     "groups[0].rollouts[1].token_ids is empty"),
    ("empty prompt", lambda g: g[1].ClearField("prompt_token_ids"),
     "groups[1].prompt_token_ids is empty"),
    ("bad run id", lambda g: [setattr(x, "run_id", "a b/{c}") for x in g], "groups[0].run_id"),
    ("two runs", lambda g: setattr(g[1], "run_id", "other-run"), "groups[1].run_id"),
    ("empty prompt id", lambda g: setattr(g[1], "prompt_id", ""), "groups[1].prompt_id"),
    ("repeated key", lambda g: setattr(g[1], "prompt_id", "x"), "groups[1] repeats the key"),
    ("negative step", lambda g: setattr(g[0], "step", -1), "groups[0].step=-1"),
    ("negative version", lambda g: setattr(g[1].rollouts[0], "weight_version", -3),
     "groups[1].rollouts[0].weight_version=-3"),
    ("empty image", lambda g: g[0].images.add(), "groups[0].images[0] has neither"),
    ("odd group under PTS", lambda g: g[1].rollouts.pop(), "groups[1].rollouts has 3 rollouts"),
]  # fmt: skip


@pytest.fixture
def stored(buffer, run_id):
    """A run with data, and its batch, to check that bad input changes nothing."""
    buffer.client.put_groups(random_groups(run_id, step=0, count=4))
    return buffer.client.sample(run_id, 0, policy_version=0)


def assert_intact(buffer, run_id, stored):
    assert buffer.client.health() == health_pb2.HealthCheckResponse.SERVING
    assert buffer.client.sample(run_id, 0, policy_version=0).items == stored.items
    assert buffer.client.stats(run_id).counters.groups_stored == 4


@pytest.mark.parametrize(("change", "message"), [c[1:] for c in BAD_PUTS],
                         ids=[c[0] for c in BAD_PUTS])  # fmt: skip
def test_bad_put_is_invalid_argument(buffer, run_id, stored, change, message):
    request = mutate(run_id, change)
    with pytest.raises(grpc.RpcError) as info:
        buffer.client._stub.PutGroups(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    assert message in info.value.details()
    assert_intact(buffer, run_id, stored)


def test_token_ids_must_be_in_the_runs_vocabulary(buffer, run_id):
    def group(prompt_id, prompt_ids, response_ids):
        g = make_group(run_id, 0, prompt_id, [1, 0, 0, 1])
        g.prompt_token_ids[:] = prompt_ids
        for r in g.rollouts:
            r.token_ids[:] = response_ids
            r.logprobs[:] = [-0.5] * len(response_ids)
        return g

    spec = pb.RunSpec(vocab_size=1000)
    good = group("a", [0, 999], [5, 999, 7])
    refused = [
        (group("b", [3, 1000], [5]), "groups[1].prompt_token_ids[1] is 1000, outside the "
         "vocabulary [0, 1000) of the run (spec.vocab_size)"),
        (group("b", [3], [5, 6, 2**32 - 1]), "groups[1].rollouts[0].token_ids[2] is 4294967295"),
    ]  # fmt: skip
    for bad, message in refused:
        with pytest.raises(grpc.RpcError) as info:
            buffer.client.put_groups([good, bad], spec=spec)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()
    with pytest.raises(grpc.RpcError):
        buffer.client.stats(run_id)  # NOT_FOUND: nothing of the refused puts was written

    # values at the bounds are accepted: ids below vocab_size, |reward| = 1e6, a log-prob a
    # rounding above 0; the run keeps its vocab_size and checks later puts without a spec
    good.rollouts[0].reward, good.rollouts[1].reward = 1e6, -1e6
    good.rollouts[2].logprobs[0] = 5e-5
    assert buffer.client.put_groups([good], spec=spec).spec.vocab_size == 1000
    with pytest.raises(grpc.RpcError) as info:
        buffer.client.put_groups([refused[0][0]])
    assert "outside the vocabulary [0, 1000)" in info.value.details()
    assert buffer.client.sample(run_id, 0, policy_version=0, spec=spec).groups == 1


def test_error_messages_echo_at_most_200_characters(buffer, run_id):
    huge = "x" * 2**20
    with_run_id, with_prompt_id = random_groups(run_id, 0, 1), random_groups(run_id, 0, 1)
    with_run_id[0].run_id = huge
    with_prompt_id[0].prompt_id = huge
    cases = [
        (lambda: buffer.client.put_groups(with_run_id), "groups[0].run_id='xxx"),
        (lambda: buffer.client.put_groups(with_prompt_id), "groups[0].prompt_id='xxx"),
        (lambda: buffer.client.put_groups(random_groups(run_id, 0, 1),
                                          spec=pb.RunSpec(algorithm=huge)), "spec.algorithm="),
        (lambda: buffer.client.sample(huge, 0, 0), "run_id='xxx"),
        (lambda: buffer.client.stats(huge), "run_id='xxx"),
        (lambda: buffer.client.drop_run(huge), "run_id='xxx"),
    ]  # fmt: skip
    for call, message in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        details = info.value.details()
        assert message in details and f"... ({len(huge) + 2} chars)" in details, details
        assert len(details) < 500, (message, len(details))


@pytest.mark.parametrize(
    ("spec", "message"),
    [(pb.RunSpec(keep_ratio=1.5), "spec.keep_ratio=1.5"),
     (pb.RunSpec(algorithm="ppo"), "spec.algorithm='ppo'"),
     (pb.RunSpec(shuffle_times=0), "spec.shuffle_times=0")],
)  # fmt: skip
def test_bad_spec_is_invalid_argument(buffer, run_id, stored, spec, message):
    with pytest.raises(grpc.RpcError) as info:
        buffer.client.put_groups([make_group(run_id, 1, "x", [1, 0])], spec=spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()
    assert_intact(buffer, run_id, stored)


def wrong_type_requests(run_id):
    good = make_group(run_id, 0, "x", [1, 0, 0, 1])
    rollout = good.rollouts[0].SerializeToString()
    head = pb.Group(run_id=run_id, prompt_id="x", prompt_token_ids=[1]).SerializeToString()
    reward_as_text = head + field(6, rollout + field(3, b"high"))  # Rollout.reward: double
    unknown_field = head + field(6, rollout) + field(99, b"?")
    return [
        ("garbage", b"\xff\xff\xff\xff", "not a valid shuffle_r1.buffer.v1.PutGroupsRequest"),
        ("another message", pb.SampleRequest(run_id=run_id, step=3).SerializeToString(),
         "not a valid shuffle_r1.buffer.v1.PutGroupsRequest"),
        ("reward as text", put_bytes(reward_as_text),
         "groups[0].rollouts[0].reward has the wrong type"),
        ("unknown field", put_bytes(unknown_field),
         "groups[0].<field 99> is not a field of shuffle_r1.buffer.v1.Group"),
    ]  # fmt: skip


def test_wrong_types_are_invalid_argument(buffer, run_id, stored):
    channel = grpc.insecure_channel(buffer.address)
    raw_put = channel.unary_unary(PUT)  # bytes in, bytes out
    for name, request, message in wrong_type_requests(run_id):
        with pytest.raises(grpc.RpcError) as info:
            raw_put(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert message in info.value.details(), (name, info.value.details())
    channel.close()
    assert_intact(buffer, run_id, stored)


def test_unknown_run_and_step(buffer, run_id, stored):
    cases = [
        (lambda: buffer.client.sample("no-such-run", 0, 0), grpc.StatusCode.NOT_FOUND,
         "run 'no-such-run' holds no data"),
        (lambda: buffer.client.sample(run_id, 5, 0), grpc.StatusCode.NOT_FOUND,
         "holds no groups for step 5"),
        (lambda: buffer.client.stats("no-such-run"), grpc.StatusCode.NOT_FOUND, "no-such-run"),
        (lambda: buffer.client.stats(run_id, step=5), grpc.StatusCode.NOT_FOUND, "no step 5"),
        (lambda: buffer.client.sample("bad id", 0, 0), grpc.StatusCode.INVALID_ARGUMENT,
         "run_id='bad id'"),
        (lambda: buffer.client.sample(run_id, 0, -1), grpc.StatusCode.INVALID_ARGUMENT,
         "policy_version=-1"),
        (lambda: buffer.client.sample(run_id, -2, 0), grpc.StatusCode.INVALID_ARGUMENT,
         "step=-2"),
        (lambda: buffer.client.sample(run_id, 0, 0, expected_groups=-1),
         grpc.StatusCode.INVALID_ARGUMENT, "expected_groups=-1"),
        (lambda: buffer.client.drop_run(""), grpc.StatusCode.INVALID_ARGUMENT, "run_id=''"),
    ]  # fmt: skip
    for call, code, message in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == code, message
        assert message in info.value.details(), (message, info.value.details())
    assert_intact(buffer, run_id, stored)


def test_oversize_messages(start_buffer, run_id):
    buffer = start_buffer(max_message_mb=1)
    big = make_group(run_id, 0, "big", [1, 0])
    big.rollouts[0].token_ids.extend(range(300_000))  # 1.2 MB on the wire
    with pytest.raises(grpc.RpcError) as info:
        buffer.client.put_groups([big])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    # groups that fit one by one, but whose batch does not
    for i in range(3):
        g = make_group(run_id, 0, f"g{i}", [1, 0])
        for r in g.rollouts:
            r.token_ids[:] = range(60_000)
            r.logprobs[:] = [-0.5] * 60_000
        buffer.client.put_groups([g], spec=pb.RunSpec(algorithm="grpo"))
    with pytest.raises(grpc.RpcError) as info:
        buffer.client.sample(run_id, 0, policy_version=0)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max message size of 1 MiB" in info.value.details()
    assert buffer.client.health() == health_pb2.HealthCheckResponse.SERVING
    assert buffer.client.stats(run_id).steps[0].groups_stored == 3
