"""Fuzzing the buffer's gRPC API (issue #8): random bytes, mangled and valid-but-wrong
messages, oversize payloads and wrong tokens, sent through a raw channel to a real server.
Every answer carries a status servicer.py documents for the method (never UNKNOWN or
INTERNAL), the server keeps serving, and a run stored before the fuzzing is byte for byte
unchanged (its Redis keys' DUMP). The server has its own Redis: random requests may create
or drop runs."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import redis
from buffer_helpers import dump_run, make_group, random_groups, varint
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import replay_buffer_pb2 as pb
from services.embedded_redis import EmbeddedRedis, redis_client
from services.replay_buffer.server import serve
from services.replay_buffer.servicer import SERVICE_NAME
from shuffle_r1.config import AlgorithmConfig, BufferConfig
from shuffle_r1.limits import MAX_ABS_REWARD, MAX_LOGPROB

C = grpc.StatusCode
TOKEN = "fuzz-token-3d9a"
PROTECTED = "protected-run"
FUZZ_RUN = "fuzz-run"
METHODS = ("PutGroups", "Sample", "Stats", "DropRun")
REQUESTS = {"PutGroups": pb.PutGroupsRequest, "Sample": pb.SampleRequest,
            "Stats": pb.StatsRequest, "DropRun": pb.DropRunRequest}  # fmt: skip
# What servicer.py documents for each method, for a request within the size limit that
# carries the token (Redis is up here, so no UNAVAILABLE).
DOCUMENTED = {
    "PutGroups": {C.OK, C.INVALID_ARGUMENT, C.FAILED_PRECONDITION, C.ALREADY_EXISTS, C.ABORTED},
    "Sample": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.ABORTED},
    "Stats": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND},
    "DropRun": {C.OK, C.INVALID_ARGUMENT},
}
FUZZ = settings(max_examples=60, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])  # fmt: skip


@dataclass(repr=False)  # short in hypothesis' reports
class Target:
    channel: grpc.Channel
    redis: redis.Redis
    stored: dict[bytes, bytes]  # DUMP of the protected run's keys before any fuzzing
    batch: bytes  # its step 1 batch, sampled before any fuzzing

    def call(self, method: str, payload: bytes, token: str | None = TOKEN) -> C:
        """Send ``payload`` as the request of ``method``; the status code of the answer."""
        return self.answer(method, payload, token)[0]

    def answer(self, method: str, payload: bytes, token: str | None = TOKEN) -> tuple[C, bytes]:
        """The status code and the response bytes (empty unless OK) of one raw call."""
        rpc = self.channel.unary_unary(f"/{SERVICE_NAME}/{method}")
        metadata = None if token is None else (("authorization", f"Bearer {token}"),)
        try:
            return C.OK, rpc(payload, timeout=30, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code(), b""  # type: ignore[return-value]

    def assert_intact(self) -> None:
        health = health_pb2_grpc.HealthStub(self.channel)
        answer = health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        assert dump_run(self.redis, PROTECTED) == self.stored


STEP_1 = pb.SampleRequest(run_id=PROTECTED, step=1, policy_version=0, expected_groups=4)


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    """A server (token, 1 MiB messages) on a private Redis holding the protected run."""
    with EmbeddedRedis() as private:
        cfg = BufferConfig(redis_url=private.url, keep_steps=4, auth_token=TOKEN,
                           max_message_mb=1)  # fmt: skip
        server, port = serve(cfg, AlgorithmConfig())
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 8 * 2**20)]
        )
        client = redis_client(private.url)
        try:
            t = Target(channel, client, {}, b"")
            put = random_groups(PROTECTED, 0, 4) + random_groups(PROTECTED, 1, 4)
            assert t.call("PutGroups", pb.PutGroupsRequest(groups=put).SerializeToString()) == C.OK
            code, t.batch = t.answer("Sample", STEP_1.SerializeToString())
            assert code == C.OK
            t.stored = dump_run(client, PROTECTED)
            assert len(t.stored) >= 10
            yield t
        finally:
            channel.close()
            client.close()
            server.stop(0).wait()


# ---- strategies ------------------------------------------------------------------------

int64 = st.integers(-(2**63), 2**63 - 1)
doubles = st.floats(allow_nan=True, allow_infinity=True)
run_ids = st.sampled_from([FUZZ_RUN, PROTECTED, "", "bad id", "x" * 200, "{tag}", "ÿ"])


@st.composite
def rollouts(draw: st.DrawFn) -> pb.Rollout:
    tokens = draw(st.lists(st.integers(0, 2**32 - 1), max_size=6))
    length = draw(st.sampled_from([len(tokens), len(tokens), draw(st.integers(0, 7))]))
    return pb.Rollout(
        token_ids=tokens,
        logprobs=draw(st.lists(st.floats(width=32), min_size=length, max_size=length)),
        reward=draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), doubles)),
        weight_version=draw(st.one_of(st.integers(0, 3), int64)),
        truncated=draw(st.booleans()),
    )


@st.composite
def groups(draw: st.DrawFn, run_id: str) -> pb.Group:
    images = draw(
        st.lists(
            st.sampled_from([pb.Image(data=b"\x89PNG"), pb.Image(uri="file:///x.png"), pb.Image()]),
            max_size=2,
        )
    )
    return pb.Group(
        run_id=run_id,
        step=draw(st.one_of(st.integers(0, 6), int64)),
        prompt_id=draw(st.one_of(st.sampled_from(["p0", "p1", "p000"]), st.text(max_size=600))),
        prompt_token_ids=draw(st.lists(st.integers(0, 2**32 - 1), max_size=4)),
        answer=draw(st.text(max_size=8)),
        rollouts=draw(st.lists(rollouts(), max_size=6)),
        images=images,
    )  # fmt: skip


specs = st.one_of(st.none(), st.builds(
    pb.RunSpec,
    algorithm=st.sampled_from(["", "grpo", "grpo+pts", "shuffle_r1", "ppo"]),
    keep_ratio=st.one_of(st.none(), doubles),
    shuffle_times=st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    vocab_size=st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
))  # fmt: skip


@st.composite
def valid_groups(draw: st.DrawFn, run_id: str) -> pb.Group:
    """A group the server accepts (n even, every field in range)."""
    rollouts = []
    for _ in range(draw(st.sampled_from([2, 4, 8]))):
        length = draw(st.integers(1, 3))
        rollouts.append(pb.Rollout(
            token_ids=draw(st.lists(st.integers(0, 2**32 - 1), min_size=length, max_size=length)),
            logprobs=draw(st.lists(st.floats(-30, 0, width=32), min_size=length, max_size=length)),
            reward=draw(st.one_of(st.sampled_from([0.0, 0.5, 1.0]), st.floats(-1e6, 1e6))),
            weight_version=draw(st.integers(0, 3)),
            truncated=draw(st.booleans()),
        ))  # fmt: skip
    return pb.Group(
        run_id=run_id,
        step=draw(st.integers(0, 6)),
        prompt_id=draw(st.one_of(st.sampled_from(["p0", "p000"]), st.text(min_size=1, max_size=9))),
        prompt_token_ids=draw(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=4)),
        answer=draw(st.text(max_size=8)),
        rollouts=rollouts,
    )  # fmt: skip


def _non_finite(draw: st.DrawFn) -> float:
    return draw(st.sampled_from([math.nan, math.inf, -math.inf]))


def _rollout(g: pb.Group, draw: st.DrawFn) -> pb.Rollout:
    return g.rollouts[draw(st.integers(0, len(g.rollouts) - 1))]


# One defect each, every one answered INVALID_ARGUMENT (servicer.py, logic.validate_put).
DEFECTS = {
    "non-finite reward": lambda g, d: setattr(_rollout(g, d), "reward", _non_finite(d)),
    "non-finite log-prob": lambda g, d: _rollout(g, d).logprobs.__setitem__(0, _non_finite(d)),
    "reward out of range": lambda g, d: setattr(
        _rollout(g, d), "reward", d(st.sampled_from([-1.0, 1.0])) * d(st.floats(1.01e6, 1e308))),
    "positive log-prob": lambda g, d: _rollout(g, d).logprobs.__setitem__(
        0, d(st.floats(0.5, 2.0**127, width=32))),
    "log-probs and tokens differ in length": lambda g, d: _rollout(g, d).logprobs.append(-1.0),
    "empty response": lambda g, d: (r := _rollout(g, d), r.ClearField("token_ids"),
                                    r.ClearField("logprobs")),
    "no rollouts": lambda g, d: g.ClearField("rollouts"),
    "odd group under PTS": lambda g, d: g.rollouts.pop(),
    "empty prompt": lambda g, d: g.ClearField("prompt_token_ids"),
    "negative step": lambda g, d: setattr(g, "step", d(st.integers(-(2**63), -1))),
    "huge step": lambda g, d: setattr(g, "step", d(st.integers(10**12, 2**63 - 1))),
    "empty prompt id": lambda g, d: setattr(g, "prompt_id", ""),
    "huge prompt id": lambda g, d: setattr(g, "prompt_id", "x" * d(st.integers(513, 4000))),
    "negative weight version": lambda g, d: setattr(
        _rollout(g, d), "weight_version", d(st.integers(-(2**63), -1))),
    "empty image": lambda g, d: g.images.add(),
    "bad run id": lambda g, d: setattr(g, "run_id", d(st.sampled_from(["", "a b", "x" * 129]))),
}  # fmt: skip


@st.composite
def put_requests(draw: st.DrawFn) -> pb.PutGroupsRequest:
    run_id = draw(run_ids)
    some_groups = st.one_of(valid_groups(run_id), groups(run_id))
    request = pb.PutGroupsRequest(groups=draw(st.lists(some_groups, max_size=3)))
    spec = draw(specs)
    if spec is not None:
        request.spec.CopyFrom(spec)
    return request


def sample_requests() -> st.SearchStrategy[pb.SampleRequest]:
    return st.builds(pb.SampleRequest, run_id=run_ids, step=st.one_of(st.integers(0, 3), int64),
                     policy_version=st.one_of(st.integers(0, 3), int64),
                     expected_groups=st.integers(-(2**31), 2**31 - 1), spec=specs)  # fmt: skip


def stats_requests() -> st.SearchStrategy[pb.StatsRequest]:
    return st.builds(pb.StatsRequest, run_id=run_ids, step=st.one_of(st.none(), int64),
                     histogram_bins=st.integers(-(2**31), 2**31 - 1))  # fmt: skip


def mangle(draw: st.DrawFn, payload: bytes) -> bytes:
    """``payload`` truncated, with bytes flipped or inserted, or with a field appended whose
    number or wire type no message of the API has."""
    how = draw(st.sampled_from(["truncate", "flip", "insert", "field"]))
    at = draw(st.integers(0, len(payload)))
    if how == "truncate":
        return payload[:at]
    if how == "flip" and payload:
        at = min(at, len(payload) - 1)
        return payload[:at] + bytes([payload[at] ^ draw(st.integers(1, 255))]) + payload[at + 1 :]
    if how == "insert":
        return payload[:at] + draw(st.binary(min_size=1, max_size=8)) + payload[at:]
    number, wire = draw(st.integers(1, 2**29 - 1)), draw(st.integers(0, 7))
    return payload + varint(number << 3 | wire) + draw(st.binary(max_size=9))


def changes_the_protected_run(method: str, request: object) -> bool:
    """Whether ``request`` is valid and addresses the protected run (so it may change it,
    as it should): such requests are not sent."""
    run_id = request.run_id if method != "PutGroups" else (  # type: ignore[attr-defined]
        request.groups[0].run_id if request.groups else ""  # type: ignore[attr-defined]
    )  # fmt: skip
    return run_id == PROTECTED and method != "Stats"


def valid_enough(request: pb.PutGroupsRequest | pb.SampleRequest) -> bool:
    """A request that the server may accept (then it could legitimately change a run)."""
    if isinstance(request, pb.SampleRequest):
        return request.step >= 0 and request.policy_version >= 0 and request.expected_groups >= 0
    for g in request.groups:
        if not g.rollouts or g.step < 0 or not g.prompt_token_ids:
            return False
        for r in g.rollouts:
            if not r.token_ids or len(r.logprobs) != len(r.token_ids) or r.weight_version < 0:
                return False
            if not math.isfinite(r.reward) or not all(map(math.isfinite, r.logprobs)):
                return False
            if abs(r.reward) > MAX_ABS_REWARD or max(r.logprobs) > MAX_LOGPROB:
                return False
    return bool(request.groups)


# ---- the fuzz tests ----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(payload=st.binary(max_size=512))
def test_random_bytes(target, method, payload):
    code = target.call(method, payload)
    assert code in DOCUMENTED[method] - {C.OK} or (code == C.OK and method != "PutGroups"), code


@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(data=st.data())
def test_mangled_and_foreign_messages(target, method, data):
    """A valid message of any of the four types (so also another method's), mangled."""
    other = data.draw(st.sampled_from(METHODS))
    message = {"PutGroups": put_requests(), "Sample": sample_requests(),
               "Stats": stats_requests(),
               "DropRun": st.builds(pb.DropRunRequest, run_id=run_ids)}[other]  # fmt: skip
    request = data.draw(message)
    payload = mangle(data.draw, request.SerializeToString())
    try:
        parsed = REQUESTS[method].FromString(payload)
        if changes_the_protected_run(method, parsed) and (
            method == "DropRun" or valid_enough(parsed)  # type: ignore[arg-type]
        ):
            return  # a valid request to change the protected run: not what this checks
    except Exception:
        pass
    assert target.call(method, payload) in DOCUMENTED[method]


@FUZZ
@given(request=put_requests())
def test_structured_puts(target, request):
    """Typed but wild values: NaN/inf/huge rewards, positive log-probs, empty groups,
    600-byte prompt ids, negative or huge steps and versions, odd group sizes, bad specs; to
    the protected run only requests the server must refuse."""
    protected = request.groups and request.groups[0].run_id == PROTECTED
    if protected and valid_enough(request):
        request.groups[0].rollouts[0].reward = math.nan  # make it one the server must refuse
    code = target.call("PutGroups", request.SerializeToString())
    assert code in DOCUMENTED["PutGroups"]
    if protected:
        assert code != C.OK


@FUZZ
@given(data=st.data())
def test_defective_puts_to_the_protected_run_are_refused(target, data):
    """Valid groups of the protected run with one defect, at a random place: refused as a
    whole (INVALID_ARGUMENT), nothing of the request written."""
    groups = data.draw(st.lists(valid_groups(PROTECTED), min_size=1, max_size=3,
                                unique_by=lambda g: (g.step, g.prompt_id)))  # fmt: skip
    defect = data.draw(st.sampled_from(sorted(DEFECTS)))
    DEFECTS[defect](groups[data.draw(st.integers(0, len(groups) - 1))], data.draw)
    code = target.call("PutGroups", pb.PutGroupsRequest(groups=groups).SerializeToString())
    assert code == C.INVALID_ARGUMENT, defect


@FUZZ
@given(request=sample_requests())
def test_structured_samples_and_stats(target, request):
    if request.run_id == PROTECTED and valid_enough(request):
        request.policy_version = -1  # a valid Sample may drop stale groups: send a refused one
    assert target.call("Sample", request.SerializeToString()) in DOCUMENTED["Sample"]
    stats = pb.StatsRequest(run_id=request.run_id, histogram_bins=request.expected_groups)
    assert target.call("Stats", stats.SerializeToString()) in DOCUMENTED["Stats"]


def test_conflicting_and_mismatched_requests_change_nothing(target):
    clash = make_group(PROTECTED, 0, "p000", [1.0, 0.0, 0.0, 1.0])  # same key, other content
    cases = [
        ("PutGroups", pb.PutGroupsRequest(groups=[clash]), C.ALREADY_EXISTS),
        ("PutGroups", pb.PutGroupsRequest(groups=[make_group(PROTECTED, 1, "new", [1, 0])],
                                          spec=pb.RunSpec(algorithm="grpo")),
         C.FAILED_PRECONDITION),
        ("Sample", pb.SampleRequest(run_id=PROTECTED, step=0, policy_version=99,
                                    spec=pb.RunSpec(algorithm="grpo")), C.FAILED_PRECONDITION),
        ("Sample", pb.SampleRequest(run_id=PROTECTED, step=0, expected_groups=5),
         C.FAILED_PRECONDITION),
        ("Sample", pb.SampleRequest(run_id=PROTECTED, step=0,
                                    spec=pb.RunSpec(shuffle_times=2**31 - 1)), C.INVALID_ARGUMENT),
        ("Stats", pb.StatsRequest(run_id=PROTECTED, histogram_bins=2**31 - 1), C.INVALID_ARGUMENT),
    ]  # fmt: skip
    for method, request, code in cases:
        assert target.call(method, request.SerializeToString()) == code, (method, request)
    target.assert_intact()


@pytest.mark.parametrize("method", METHODS)
def test_oversize_payloads_are_resource_exhausted(target, method):
    big = pb.DropRunRequest(run_id=PROTECTED).SerializeToString() + b"\x00" * (2**20 + 1)
    assert target.call(method, big) == C.RESOURCE_EXHAUSTED
    put = pb.PutGroupsRequest(groups=[make_group(PROTECTED, 5, "big", [1, 0])])
    put.groups[0].rollouts[0].token_ids.extend(range(300_000))  # 1.2 MB, otherwise fine
    assert target.call("PutGroups", put.SerializeToString()) == C.RESOURCE_EXHAUSTED
    target.assert_intact()


@pytest.mark.parametrize("method", METHODS)
@FUZZ
@given(token=st.one_of(st.none(), st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                           max_size=40)))  # fmt: skip
def test_missing_or_wrong_token_is_unauthenticated(target, method, token):
    if token == TOKEN:
        token += "x"
    # valid requests that would change the protected run, had they the token
    request = {"PutGroups": pb.PutGroupsRequest(groups=random_groups(PROTECTED, 2, 2)),
               "Sample": pb.SampleRequest(run_id=PROTECTED, step=0, policy_version=50),
               "Stats": pb.StatsRequest(run_id=PROTECTED),
               "DropRun": pb.DropRunRequest(run_id=PROTECTED)}[method]  # fmt: skip
    assert target.call(method, request.SerializeToString(), token=token) == C.UNAUTHENTICATED


def test_after_the_fuzzing_the_run_serves_as_before(target):
    target.assert_intact()
    assert target.answer("Sample", STEP_1.SerializeToString()) == (C.OK, target.batch)
