"""Rollout engines, the rollout worker actor and the pool, on real engines and a real Ray.

The model is the tiny random Llama (SmolLM2's tokenizer and vocabulary): its next-token
distribution is nearly uniform over 49152 tokens, so it never samples EOS by chance and
every completion runs to ``max_tokens`` unless a test makes a token the EOS.
"""

import json
import os
import shutil
import signal
import threading

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from actors.rollout import (
    GenerationRequest,
    HFEngine,
    RolloutPool,
    SamplingSpec,
)
from shuffle_r1.config import RolloutConfig
from shuffle_r1.models import build_tiny_llama

HF = RolloutConfig(engine="hf", threads_per_worker=1, dtype="float32")
PROMPTS = [[1, 9690, 198, 2683], [1, 4093, 198, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198], [1]]


def requests(count=3, prefix="q"):
    return [
        GenerationRequest(f"{prefix}{i}", PROMPTS[i % len(PROMPTS)] + [100 + i])
        for i in range(count)
    ]


def keys(completions):
    return [(c.request_id, c.index) for c in completions]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_other(tmp_path_factory):
    """The same architecture with other weights (seed 1): what a learner step produces."""
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-1", seed=1)


@pytest.fixture(scope="module")
def other_state(tiny_other):
    return AutoModelForCausalLM.from_pretrained(tiny_other).state_dict()


@pytest.fixture(scope="module")
def engine(tiny):
    return HFEngine(tiny, HF, seed=0)


def test_sampling_spec_rejects_bad_values():
    for bad in ({"n": 0}, {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"max_tokens": 0}):
        args = {"n": 2, "temperature": 1.0, "top_p": 1.0, "max_tokens": 4} | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingSpec(**args)


def test_hf_generate_gives_n_completions_per_request_in_order(engine):
    spec = SamplingSpec(n=4, temperature=1.0, top_p=0.95, max_tokens=12, seed=0)
    out = engine.generate(requests(3), spec)
    assert keys(out) == [(f"q{r}", i) for r in range(3) for i in range(4)]
    for c in out:
        assert len(c.token_ids) == len(c.logprobs) == 12
        assert (c.finish_reason, c.weight_version) == ("length", 0)
        assert all(-30 < lp <= 0 for lp in c.logprobs)
        assert all(0 <= t < 49152 for t in c.token_ids)
    assert len({tuple(c.token_ids) for c in out}) == len(out)  # the n samples differ


def test_hf_temperature_zero_is_greedy(engine):
    out = engine.generate(requests(2), SamplingSpec(n=2, temperature=0.0, top_p=1.0, max_tokens=6))
    for first, second in zip(out[::2], out[1::2], strict=True):
        assert first.token_ids == second.token_ids  # no sampling: the n completions agree
        prompt = next(r.prompt_token_ids for r in requests(2) if r.request_id == first.request_id)
        ids = torch.tensor([prompt + first.token_ids])
        with torch.no_grad():
            logits = engine.model(ids).logits[0, len(prompt) - 1 : -1].float()
        assert logits.argmax(-1).tolist() == first.token_ids[: len(logits)]
        expected = torch.log_softmax(logits, -1).max(-1).values  # log-probs at temperature 1
        torch.testing.assert_close(torch.tensor(first.logprobs), expected, atol=1e-4, rtol=0)


def test_hf_seed_makes_each_request_reproducible_wherever_it_is_served(engine):
    spec = SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=6, seed=7)
    batch = engine.generate(requests(3), spec)
    alone = engine.generate(requests(3)[2:], spec)  # a request re-sent on its own
    assert [c.token_ids for c in batch[4:]] == [c.token_ids for c in alone]
    assert batch[4].logprobs == alone[0].logprobs
    assert engine.generate(requests(3), spec) == batch
    other = engine.generate(requests(3), SamplingSpec(2, 1.0, 1.0, 6, seed=8))
    assert [c.token_ids for c in other] != [c.token_ids for c in batch]


def test_hf_logprobs_are_log_softmax_of_logits_over_temperature(engine):
    """Before the top-p cut: log_softmax(logits / T) of a plain forward pass, at the
    sampled tokens; the tokens themselves respect top-p and have no hidden top-k."""
    temperature, top_p = 0.7, 0.6
    spec = SamplingSpec(n=3, temperature=temperature, top_p=top_p, max_tokens=10, seed=1)
    reqs = requests(2)
    out = engine.generate(reqs, spec)
    ranks = []
    for c in out:
        prompt = next(r.prompt_token_ids for r in reqs if r.request_id == c.request_id)
        ids = torch.tensor([prompt + c.token_ids])
        with torch.no_grad():
            logits = engine.model(ids).logits[0, len(prompt) - 1 : -1].float()  # (T, V)
        logprobs = torch.log_softmax(logits / temperature, dim=-1)
        token = torch.tensor(c.token_ids)[:, None]
        expected = logprobs.gather(1, token).squeeze(1)
        torch.testing.assert_close(torch.tensor(c.logprobs), expected, atol=1e-4, rtol=0)
        # top-p: the probability mass strictly above each sampled token is below top_p
        probs = logprobs.exp()
        above = (probs * (probs > probs.gather(1, token))).sum(1)
        assert (above < top_p).all()
        ranks += (logits > logits.gather(1, token)).sum(1).tolist()
    assert max(ranks) > 50  # transformers' default top-k of 50 is off


def test_hf_stops_at_eos_and_drops_what_follows(engine, tiny, tmp_path):
    spec = SamplingSpec(n=4, temperature=1.0, top_p=1.0, max_tokens=8, seed=3)
    reqs = requests(2)
    free = engine.generate(reqs, spec)
    eos = free[0].token_ids[3]
    stopping = shutil.copytree(tiny, tmp_path / "tiny-eos")
    gen_config = json.loads((stopping / "generation_config.json").read_text())
    (stopping / "generation_config.json").write_text(
        json.dumps(gen_config | {"eos_token_id": [eos]})
    )
    stopped = HFEngine(stopping, HF, seed=0).generate(reqs, spec)
    assert stopped[0].token_ids == free[0].token_ids[:4]
    for before, after in zip(free, stopped, strict=True):
        assert after.token_ids == before.token_ids[: len(after.token_ids)]  # same draws
        assert after.logprobs == pytest.approx(before.logprobs[: len(after.logprobs)], abs=1e-5)
        if after.finish_reason == "stop":
            assert after.token_ids[-1] == eos and eos not in after.token_ids[:-1]
        else:
            assert len(after.token_ids) == 8 and eos not in after.token_ids


def test_hf_load_weights_in_place(tiny, tiny_other, other_state):
    spec = SamplingSpec(n=2, temperature=1.0, top_p=1.0, max_tokens=6, seed=5)
    engine = HFEngine(tiny, HF, seed=0)
    before = engine.generate(requests(2), spec)
    engine.load_weights(3, other_state)
    after = engine.generate(requests(2), spec)
    fresh = HFEngine(tiny_other, HF, seed=0).generate(requests(2), spec)
    assert engine.weight_version == 3 and {c.weight_version for c in after} == {3}
    assert [c.logprobs for c in after] != [c.logprobs for c in before]
    assert [c.token_ids for c in after] == [c.token_ids for c in fresh]
    assert [c.logprobs for c in after] == [c.logprobs for c in fresh]

    partial = dict(other_state)
    del partial["model.norm.weight"]
    with pytest.raises(RuntimeError, match=r"model\.norm\.weight"):
        engine.load_weights(4, partial)
    assert engine.weight_version == 3


POOL = RolloutConfig(
    engine="hf", threads_per_worker=1, num_workers=2, max_workers=2, dtype="float32"
)


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny):
    pool = RolloutPool(POOL, tiny, run_id="test-rollout-pool", namespace="shuffle-r1-tests")
    yield pool
    pool.shutdown()


def versions(pool):
    return sorted(w["weight_version"] for w in pool.workers())


def test_pool_syncs_every_worker_and_keeps_request_order(pool, tiny_other, other_state):
    spec = SamplingSpec(n=2, temperature=1.0, top_p=0.9, max_tokens=8, seed=11)
    reqs = requests(5)
    first = pool.generate(reqs, spec)
    assert keys(first.completions) == [(r.request_id, i) for r in reqs for i in range(2)]
    assert {c.weight_version for c in first.completions} == {0}
    assert first.tokens == 5 * 2 * 8 and first.resent == 0 and first.sync_s == 0.0
    assert sorted(first.served.values()) == [2, 3]  # one chunk per worker

    ref = ray.put(other_state)
    result = pool.generate(reqs, spec, weights=(1, ref))
    assert versions(pool) == [1, 1]
    assert {c.weight_version for c in result.completions} == {1}
    assert result.sync_s > 0 and result.generate_s > 0
    assert 0 < result.engine_s <= result.generate_s  # the engines' share of the call
    # exactly what one engine on the new weights gives, request by request
    fresh = HFEngine(tiny_other, HF, seed=0).generate(reqs, spec)
    assert [c.token_ids for c in result.completions] == [c.token_ids for c in fresh]
    assert [c.logprobs for c in result.completions] == [c.logprobs for c in fresh]
    assert pool.generate(reqs, spec, weights=(1, ref)).sync_s == 0.0  # already there

    with pytest.raises(ValueError, match="unique"):
        pool.generate(reqs + reqs[:1], spec)


def test_pool_resends_the_requests_of_a_worker_killed_mid_generation(pool, other_state):
    ref = ray.put(other_state)
    pool.generate(requests(2), SamplingSpec(1, 1.0, 1.0, 1), weights=(1, ref))  # both warm
    victim = pool.workers()[0]
    spec = SamplingSpec(n=4, temperature=1.0, top_p=1.0, max_tokens=48, seed=2)
    reqs = requests(8, prefix="k")
    killer = threading.Timer(0.5, os.kill, args=(victim["pid"], signal.SIGKILL))
    killer.start()
    result = pool.generate(reqs, spec, weights=(1, ref))
    killer.join()
    assert result.resent == 4  # the victim's contiguous half
    assert keys(result.completions) == [(r.request_id, i) for r in reqs for i in range(4)]
    assert all(len(c.token_ids) == 48 for c in result.completions)
    # what the workers did: the survivor's chunk once, the victim's chunk once more by the
    # survivor (the victim died before it finished, so it recorded nothing)
    ledger = ray.get(pool.store.generated.remote("k"))
    assert sorted(ledger) == sorted(r.request_id for r in reqs)
    assert set(ledger.values()) == {1}

    # Serve replaces the victim; the newcomer loads the newest weights before it serves
    pool.wait_for_workers(2, timeout_s=60)
    assert victim["worker"] not in {w["worker"] for w in pool.workers()}
    assert versions(pool) == [1, 1]
    again = pool.generate(reqs[:4], spec, weights=(1, ref))
    assert [c.token_ids for c in again.completions] == [
        c.token_ids for c in result.completions[:16]
    ]


def test_pool_scales_by_hand_within_its_bounds(pool, other_state):
    with pytest.raises(
        ValueError, match=r"outside \[rollout.min_workers=1, rollout.max_workers=2\]"
    ):
        pool.scale(3)
    pool.scale(1)
    pool.wait_for_workers(1, timeout_s=60)
    spec = SamplingSpec(n=1, temperature=1.0, top_p=1.0, max_tokens=4, seed=0)
    assert len(pool.generate(requests(3), spec).served) == 1
    pool.scale(2)
    pool.wait_for_workers(2, timeout_s=60)
    assert len(pool.generate(requests(3), spec).served) == 2


@pytest.mark.slow
def test_autoscaling_pool_grows_on_pending_prompts_and_shrinks_when_idle(ray_cluster, tiny):
    cfg = RolloutConfig(
        engine="hf", threads_per_worker=1, num_workers=1, max_workers=2, autoscaling=True,
        target_prompts_per_worker=1, upscale_delay_s=0.0, downscale_delay_s=1.0,
        autoscale_look_back_s=1.0, dtype="float32",
    )  # fmt: skip
    pool = RolloutPool(cfg, tiny, run_id="test-autoscale", namespace="shuffle-r1-tests")
    try:
        with pytest.raises(ValueError, match="autoscales"):
            pool.scale(2)
        spec = SamplingSpec(n=4, temperature=1.0, top_p=1.0, max_tokens=64, seed=0)
        seen = set()
        for attempt in range(6):  # each call queues 8 one-prompt requests for 1 worker
            result = pool.generate(requests(8, prefix=f"a{attempt}-"), spec)
            seen |= set(result.served)
            if len(result.served) == 2:
                break
        assert len(seen) >= 2, "Serve never added a second worker for the pending prompts"
        ledger = ray.get(pool.store.generated.remote("a"))
        assert set(ledger.values()) == {1}  # each request once, whichever worker ran it
        pool.wait_for_workers(1, timeout_s=60)  # idle: back to min_workers
    finally:
        pool.shutdown()
