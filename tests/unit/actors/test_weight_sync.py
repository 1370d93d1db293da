"""Weights from the learner to the rollout engines in flat buckets
(``actors/rollout/transport.py``), on a real Ray, real FSDP2 ranks and real engines.

The learner below runs 3 FSDP2 ranks on the tiny random Llama (hidden 64): 64 rows do not
split evenly over 3 ranks (22, 22, 20), so the gather puts uneven shards in place. It holds
3 of the test Ray's 4 CPUs for the module (a published object lives as long as the rank
that put it); the engines get half a CPU each. What arrives must equal the model's own
state dict, bit for bit in float32, and an engine that loads it must generate what a fresh
engine on those weights generates.
"""

from __future__ import annotations

import importlib.util
import pickle
import time

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from actors.learner import LearnerGroup
from actors.rollout import GenerationRequest, HFEngine, RolloutWorker, SamplingSpec
from actors.rollout.transport import pack, tied_names
from shuffle_r1.config import Config, RolloutConfig
from shuffle_r1.models import build_tiny_llama

REQUESTS = [GenerationRequest(f"w{i}", [1, 9690, 198, 2683, 100 + i]) for i in range(3)]
GREEDY = SamplingSpec(n=1, temperature=0.0, top_p=1.0, max_tokens=12, seed=0)


def test_pack_casts_into_one_bucket_per_dtype_and_unpickles_to_views():
    a = torch.randn(3, 4)
    state = {
        "a": a,
        "tied": a,
        "b": torch.randn(5, dtype=torch.float64),
        "steps": torch.arange(3),
    }
    tied = tied_names(state)
    assert tied == [("tied", "a")]
    flat = pack(state, torch.bfloat16, tied)
    assert flat.layout.dtypes == ("bfloat16", "int64")
    assert flat.layout.sizes == (12 + 5, 3)  # the tied tensor once
    assert flat.nbytes == 17 * 2 + 3 * 8
    out = pickle.loads(pickle.dumps(flat, protocol=5))
    assert list(out) == ["a", "b", "steps", "tied"]
    assert out["tied"] is out["a"]
    assert torch.equal(out["a"], a.to(torch.bfloat16)) and out["a"].shape == (3, 4)
    assert torch.equal(out["b"], state["b"].to(torch.bfloat16))
    assert torch.equal(out["steps"], torch.arange(3))
    # every view lies in its bucket's one buffer
    assert out["b"].data_ptr() == out["a"].data_ptr() + 12 * 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_other(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-1", seed=1)


def publish(tiny_other, shared_memory: bool):
    """The weights of ``tiny_other`` as 3 FSDP2 ranks publish them: float32, then bfloat16
    (both at version 0 of a fresh group: its weights are the folder's)."""
    cfg = Config()
    cfg.learner.num_ranks, cfg.learner.dtype, cfg.rollout.dtype = 3, "float32", "float32"
    cfg.learner.publish_shared_memory = shared_memory
    group = LearnerGroup(cfg, tiny_other)
    try:
        version, ref32 = group.publish_weights()
        parts = dict(group.last_publish_parts)
        group.publish_dtype, group.version = "bfloat16", 1  # what a bf16 engine is sent
        _, ref16 = group.publish_weights()
        yield {"version": version, "f32": ref32, "bf16": ref16, "parts": parts,
               "shared": shared_memory}  # fmt: skip
    finally:
        group.shutdown()


@pytest.fixture(scope="module")
def published(ray_cluster, tiny_other):
    """Published through the shared-memory buckets (ranks on one host, the default)."""
    yield from publish(tiny_other, shared_memory=True)


@pytest.mark.slow
def test_three_ranks_publish_the_model_state_exactly(published, tiny_other):
    check_published(published, tiny_other)


def check_published(published, tiny_other) -> None:
    """The published state is the model's, bit for bit in float32 and after the bf16 cast,
    tied names on one tensor, and the parts of the way it went were timed."""
    expected = AutoModelForCausalLM.from_pretrained(tiny_other, dtype=torch.float32).state_dict()
    for dtype in ("f32", "bf16"):
        state = ray.get(published[dtype])
        assert state.keys() == expected.keys()
        cast = torch.float32 if dtype == "f32" else torch.bfloat16
        for name, value in expected.items():
            assert torch.equal(state[name], value.to(cast)), name
        assert state["lm_head.weight"] is state["model.embed_tokens.weight"]
    parts = published["parts"]
    assert {"pack", "put", "barrier" if published["shared"] else "gather"} <= parts.keys()
    assert parts["bytes"] == 4 * sum(
        v.numel() for k, v in expected.items() if k != "lm_head.weight"
    )


@pytest.mark.slow
def test_the_published_object_is_read_in_place_not_copied(published):
    """Two reads of the object map the same shared memory (a copying deserialiser would
    give each read its own buffer); another process reads the same values."""
    first, second = ray.get(published["f32"]), ray.get(published["f32"])
    name = "model.layers.0.mlp.up_proj.weight"
    assert first[name].data_ptr() == second[name].data_ptr()

    @ray.remote(num_cpus=0)
    def checksum(state):
        return {k: float(v.double().sum()) for k, v in state.items()}

    sums = ray.get(checksum.remote(published["f32"]))
    assert sums == {k: float(v.double().sum()) for k, v in first.items()}


@pytest.mark.slow
def test_an_engine_loaded_from_the_buckets_generates_like_a_fresh_one(published, tiny, tiny_other):
    cfg = RolloutConfig(engine="hf", threads_per_worker=1, dtype="float32")
    worker = ray.remote(RolloutWorker).options(num_cpus=0.5).remote(tiny, cfg, 0)
    try:
        before = ray.get(worker.generate.remote(REQUESTS, GREEDY)).completions
        ray.get(worker.load_weights.remote(3, published["f32"]))
        after = ray.get(worker.generate.remote(REQUESTS, GREEDY)).completions
    finally:
        ray.kill(worker)
    fresh = HFEngine(tiny_other, cfg, seed=0).generate(REQUESTS, GREEDY)
    assert [c.token_ids for c in after] == [c.token_ids for c in fresh]
    assert [c.logprobs for c in after] == [c.logprobs for c in fresh]
    assert [c.token_ids for c in before] != [c.token_ids for c in after]
    assert {c.weight_version for c in after} == {3}


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")
def test_vllm_loads_weights_in_place_like_a_fresh_engine(published, tiny, tiny_other):
    """vLLM updated in place generates what a fresh vLLM engine on those weights generates:
    the same seeded tokens and log-probs within 1e-5 (bitwise on SmolLM2, docs/measured.md).
    Both ways weights arrive: the learner's read-only bucket views, and a plain state dict
    (the engine's own first weights back). Two engines, both RolloutWorker actors: one
    updated, one fresh on ``tiny_other``; 12 sequences of 401 prompt tokens exceed vLLM's
    4096-token step, so the prefill is chunked (seeded requests whose prefill got chunked
    crashed vLLM on CPU, see VLLMEngine)."""
    cfg = RolloutConfig(engine="vllm", threads_per_worker=1, kv_cache_gb=1, dtype="float32")
    actor = ray.remote(RolloutWorker).options(num_cpus=0.5)  # beside the learner's 3
    updated, fresh = actor.remote(tiny, cfg, 0), actor.remote(tiny_other, cfg, 0)
    spec = SamplingSpec(n=4, temperature=0.8, top_p=1.0, max_tokens=16, seed=4)
    reqs = [GenerationRequest(f"v{i}", [1, *range(1000 + i, 1400 + i)]) for i in range(3)]
    own = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).state_dict()
    try:
        start = time.perf_counter()
        engines = ray.get([updated.ping.remote(), fresh.ping.remote()])
        if {e["engine"] for e in engines} != {"vllm"}:
            pytest.skip("vLLM is installed but cannot be imported here")
        print(f"two vLLM workers started in {time.perf_counter() - start:.1f} s")
        before = ray.get(updated.generate.remote(reqs, spec)).completions  # fresh on tiny
        seconds = ray.get(updated.load_weights.remote(1, published["f32"]))
        after, expected = (
            reply.completions
            for reply in ray.get(
                [updated.generate.remote(reqs, spec), fresh.generate.remote(reqs, spec)]
            )
        )
        ray.get(updated.load_weights.remote(2, ray.put(own)))  # a state dict: tiny's again
        back = ray.get(updated.generate.remote(reqs, spec)).completions
    finally:
        ray.kill(updated)
        ray.kill(fresh)
    print(f"in-place update from the buckets {seconds:.3f} s")
    for got, want, version in ((after, expected, 1), (back, before, 2)):
        assert {c.weight_version for c in got} == {version}
        assert keys(got) == [(r.request_id, i) for r in reqs for i in range(4)]
        assert all(c.finish_reason == "length" and len(c.logprobs) == 16 for c in got)
        assert [c.token_ids for c in got] == [c.token_ids for c in want], version
        diff = max(
            abs(a - b)
            for x, y in zip(got, want, strict=True)
            for a, b in zip(x.logprobs, y.logprobs, strict=True)
        )
        print(f"version {version}: max |logprob - fresh| = {diff:.2e}")
        assert diff <= 1e-5, version
    assert [c.logprobs for c in before] != [c.logprobs for c in after]


def keys(completions):
    return [(c.request_id, c.index) for c in completions]
