"""The learner on a real Ray: 2 FSDP2 ranks (gloo, CPU) on the tiny random Llama.

One scenario runs once per module (building a learner group costs seconds): group A
computes log-probs, makes two updates (the second on a batch that does not split evenly
over the ranks), publishes weights and checkpoints between them; group B loads that
checkpoint and repeats the second update. The tests compare each result with a
single-process reference — a plain transformers model, torch AdamW and the same policy
loss — which shares no code with the sharding, the accumulation or the Ray plumbing.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import ray
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from actors.learner import LearnerGroup
from shuffle_r1.config import Config
from shuffle_r1.integrity import CheckpointRejectedError, CheckpointWriteError, file_digests
from shuffle_r1.models import build_tiny_llama
from shuffle_r1.training import TrainBatch, collate, token_logprobs
from tests.full_disk import small_tmpfs
from tests.unit.actors.learner_reference import reference_update

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_cluster")]

VOCAB = 49152  # the tiny Llama has SmolLM2's vocabulary
# AdamW's first step moves a weight by ~lr·g/|g|: a gradient element near zero may land on
# either side of its reference value (seen: 1 of 3.2 M elements off by 4.6e-6 at lr 1e-3;
# with each prompt run once, whose sums round differently from the full rows', 1 element
# of a 16,384-element matrix off by 5e-5, 11 of the 3.2 M in another run). Weights are
# compared to 1% of lr, all but a WEIGHT_OUTLIERS share of the elements (32 of 3.2 M), and
# those to 2 lr (an AdamW step moves none further); the grad norms, compared to 1e-5,
# catch any scaling, and a wrong gradient moves far more elements than that.
WEIGHT_ATOL = 1e-5
WEIGHT_OUTLIERS = 1e-5


def assert_weights_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Every weight within WEIGHT_ATOL of the reference, but for a WEIGHT_OUTLIERS share of
    near-zero-gradient elements, which stay within 2 x lr (make_config's 1e-3)."""
    assert got.keys() == want.keys()
    outliers = []
    total = sum(t.numel() for t in want.values())
    for name in want:
        diff = (got[name].float() - want[name].float()).abs()
        assert float(diff.max()) <= 2e-3, f"{name}: off by {float(diff.max())}"
        outliers += [(name, float(d)) for d in diff[diff > WEIGHT_ATOL].tolist()]
    assert len(outliers) <= WEIGHT_OUTLIERS * total, outliers[:20]


def make_config(backend: str = "fsdp2", zero_stage: int = 2) -> Config:
    cfg = Config()
    le = cfg.learner
    le.backend, le.zero_stage, le.num_ranks, le.dtype = backend, zero_stage, 2, "float32"
    le.lr, le.weight_decay, le.grad_clip = 1e-3, 0.01, 1.0
    le.micro_batch_size = 2  # 2 micro-batches per rank on 8 rollouts: accumulation is tested
    le.global_batch_size = 2  # 2 prompts · 2·floor(0.5·8/2) = 8 rollouts per optimizer step
    cfg.rollout.n, cfg.rollout.temperature = 8, 0.9
    cfg.rollout.dtype = "float32"  # weights are published in it: compared as float32
    cfg.algorithm.keep_ratio = 0.5
    return cfg


def make_batch(num_rollouts: int, seed: int) -> TrainBatch:
    """Rollouts of varied prompt/response lengths; each pair has a high and a low advantage.
    Both rollouts of a pair share their prompt, and every third pair repeats the previous
    pair's, as a group's pairs do (so the shared-prompt layout has prompts to share)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (num_rollouts, 2), generator=gen).tolist()
    high = torch.rand(num_rollouts // 2, generator=gen) + 0.2
    advantages = torch.stack([high, -high + 0.1], dim=1).flatten()
    prompts: list[list[int]] = []
    for pair in range(num_rollouts // 2):
        if pair % 3 == 2:
            prompt = prompts[-1]
        else:
            prompt = torch.randint(VOCAB, (lengths[2 * pair][0],), generator=gen).tolist()
        prompts += [prompt, prompt]
    return TrainBatch(
        prompt_token_ids=prompts,
        response_token_ids=[torch.randint(VOCAB, (r,), generator=gen).tolist() for _, r in lengths],
        advantages=advantages,
    )


def load_model(path: Any) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def text_logprobs(model: torch.nn.Module, batch: TrainBatch, temperature: float) -> torch.Tensor:
    c = collate(batch)
    return token_logprobs(
        model,
        c["input_ids"],
        c["attention_mask"],
        c["position_ids"],
        c["response_start"],
        c["response_mask"],
        temperature,
    )


def reference_logprobs(
    model: torch.nn.Module, batch: TrainBatch, temperature: float
) -> torch.Tensor:
    with torch.no_grad():
        return text_logprobs(model, batch, temperature)


def max_weight_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@dataclass
class Scenario:
    model_path: Any
    batch1: TrainBatch
    batch2: TrainBatch
    small: TrainBatch
    initial: dict[str, torch.Tensor] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="module")
def scenario(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    cfg = make_config()
    s = Scenario(tiny, make_batch(8, seed=1), make_batch(14, seed=2), make_batch(2, seed=3))
    s.initial = load_model(tiny).state_dict()
    r = s.results
    ckpt = tmp_path_factory.mktemp("checkpoint")
    group = LearnerGroup(cfg, tiny)
    try:
        r["v0"], ref0 = group.publish_weights()
        r["w0"] = ray.get(ref0)
        r["logp0"] = group.compute_logprobs(s.batch1)
        r["logp0_small"] = group.compute_logprobs(s.small)  # rank 1 gets no rollout
        with pytest.raises(ValueError) as error:  # kl_coef 0: no reference policy
            group.compute_logprobs(s.small, reference=True)
        r["no_reference_error"] = str(error.value)
        for name, bad in (
            ("empty", s.batch1.select(slice(0, 0))),
            ("odd", s.batch1.select(slice(0, 3))),
        ):
            with pytest.raises(ValueError) as error:
                group.update(bad, torch.zeros(len(bad), 12))
            r[f"{name}_error"] = str(error.value)
        # one mini-batch: the old log-probs come from the update's own forward pass; the
        # reference below passes logp0 explicitly, so the weights test compares both ways
        r["single_step"] = (group.single_step(8), group.single_step(14))
        r["m1"] = group.update(s.batch1, None)
        r["v1"], ref1 = group.publish_weights()
        r["v1_again"], r["ref1_again"] = group.publish_weights()
        r["ref1"] = ref1
        r["w1"] = ray.get(ref1)
        group.save_checkpoint(ckpt)
        r["logp1"] = group.compute_logprobs(s.batch2)  # 14 rollouts: shards of 8 and 6
        r["m2"] = group.update(s.batch2, r["logp1"])  # mini-batches of 8 and 6 (4 + 2: padded)
        r["v2"], ref2 = group.publish_weights()
        r["w2"] = ray.get(ref2)
    finally:
        group.shutdown()
    group = LearnerGroup(cfg, tiny)
    try:
        files = file_digests(ckpt)
        weights = files["model/model.safetensors"]
        with pytest.raises(CheckpointRejectedError) as rejected:  # a rank sees another file
            group.load_checkpoint(
                ckpt, {**files, "model/model.safetensors": {**weights, "sha256": "0" * 64}}
            )
        r["rejected_error"], r["rejected_version"] = str(rejected.value), group.version
        group.load_checkpoint(ckpt, files)
        r["b_version"] = group.version
        r["b_logp1"] = group.compute_logprobs(s.batch2)
        with pytest.raises(ValueError) as error:
            group.update(s.batch2, None)  # two mini-batches: the second needs old log-probs
        r["no_old_error"] = str(error.value)
        r["b_m2"] = group.update(s.batch2, r["b_logp1"])
        r["b_v2"], ref = group.publish_weights()
        r["b_w2"] = ray.get(ref)
        # last (a failed save stops the ranks): a checkpoint onto a full disk
        full_disk = tmp_path_factory.mktemp("full")
        with small_tmpfs(full_disk, "2m") as mounted:
            target = full_disk / "ckpt"
            if not mounted:  # rank 1's optimizer shard is /dev/full instead
                (target / "optimizer").mkdir(parents=True)
                (target / "optimizer" / "__1_0.distcp").symlink_to("/dev/full")
            with pytest.raises(CheckpointWriteError) as full:
                group.save_checkpoint(target)
            r["full_error"] = full.value
    finally:
        group.shutdown()
    r["checkpoint_files"] = sorted(p.name for p in ckpt.iterdir())
    r["checkpoint_model"] = ckpt / "model"
    return s


@pytest.fixture(scope="module")
def reference(scenario: Scenario) -> dict[str, Any]:
    """The two updates in one process from the same initial weights."""
    cfg = make_config()
    model = load_model(scenario.model_path)
    le = cfg.learner
    optimizer = torch.optim.AdamW(model.parameters(), lr=le.lr, weight_decay=le.weight_decay)
    t = cfg.rollout.temperature
    out: dict[str, Any] = {"logp0": reference_logprobs(model, scenario.batch1, t)}
    out["logp0_small"] = reference_logprobs(model, scenario.small, t)
    grad_logprobs = partial(text_logprobs, model, temperature=cfg.rollout.temperature)
    out["norms1"] = reference_update(
        model, optimizer, scenario.batch1, out["logp0"], cfg, grad_logprobs
    )
    out["w1"] = {k: v.clone() for k, v in model.state_dict().items()}
    out["logp1"] = reference_logprobs(model, scenario.batch2, t)
    out["norms2"] = reference_update(
        model, optimizer, scenario.batch2, out["logp1"], cfg, grad_logprobs
    )
    out["w2"] = {k: v.clone() for k, v in model.state_dict().items()}
    return out


def test_compute_logprobs_equal_a_single_process_model(scenario, reference) -> None:
    r = scenario.results
    assert r["logp0"].shape == (8, scenario.batch1.max_response_len)
    torch.testing.assert_close(r["logp0"], reference["logp0"], atol=1e-5, rtol=0)
    torch.testing.assert_close(r["logp0_small"], reference["logp0_small"], atol=1e-5, rtol=0)
    torch.testing.assert_close(r["logp1"], reference["logp1"], atol=1e-5, rtol=0)


def test_first_update_starts_at_ratio_one(scenario) -> None:
    """One mini-batch: every micro-batch runs on the weights that produced the old log-probs,
    so the ratio is 1, nothing is clipped and the surrogate is minus the token-mean advantage.
    """
    m1 = scenario.results["m1"]
    assert m1["num_optimizer_steps"] == 1
    assert m1["clip_fraction"] == 0.0
    assert abs(m1["approx_kl"]) < 1e-6
    batch = scenario.batch1
    expected = []  # micro-batches of 2 rollouts: pairs (0,1), (2,3), ...
    for i in range(0, 8, 2):
        lens = torch.tensor(
            [len(batch.response_token_ids[j]) for j in (i, i + 1)], dtype=torch.float
        )
        expected.append(-(batch.advantages[i : i + 2] * lens).sum() / lens.sum())
    assert m1["pg_loss"] == pytest.approx(float(torch.stack(expected).mean()), abs=1e-5)
    assert m1["policy_loss"] == m1["pg_loss"] and m1["kl"] == 0.0
    assert m1["lr"] == 1e-3


def test_update_changes_the_weights_and_is_finite(scenario) -> None:
    r = scenario.results
    for metrics in (r["m1"], r["m2"]):
        assert all(torch.isfinite(torch.tensor(v)) for v in metrics.values()), metrics
    assert max_weight_diff(r["w0"], r["w1"]) > 1e-4
    assert max_weight_diff(scenario.initial, r["w0"]) == 0.0  # publish before any update


def test_two_ranks_update_equals_a_single_process_update(scenario, reference) -> None:
    """The key check of sharding + gradient accumulation + clipping (the norm is > 1, so it
    clips): the same grad norms and the same weights after AdamW, step by step."""
    r = scenario.results
    assert r["m1"]["grad_norm"] == pytest.approx(reference["norms1"][0], rel=1e-5)
    assert reference["norms1"][0] > 1.0
    assert_weights_close(r["w1"], reference["w1"])
    # uneven: 14 rollouts → mini-batches of 8 and 6; the 6 split 4 + 2 with one padded slot
    assert r["m2"]["num_optimizer_steps"] == 2
    assert r["m2"]["grad_norm"] == pytest.approx(sum(reference["norms2"]) / 2, rel=1e-5)
    assert_weights_close(r["w2"], reference["w2"])


def test_publish_weights_versions_and_loads_into_a_fresh_model(scenario, reference) -> None:
    r = scenario.results
    assert (r["v0"], r["v1"], r["v2"]) == (0, 1, 2)
    assert r["v1_again"] == 1 and r["ref1_again"] == r["ref1"]  # same version: same object
    config = AutoConfig.from_pretrained(scenario.model_path)
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    fresh.load_state_dict(r["w1"], strict=True)
    t = make_config().rollout.temperature
    torch.testing.assert_close(
        reference_logprobs(fresh, scenario.batch2, t), r["logp1"], atol=1e-5, rtol=0
    )
    # tied embeddings come back as one tensor
    assert r["w1"]["lm_head.weight"] is r["w1"]["model.embed_tokens.weight"]


def test_checkpoint_resumes_into_a_new_group_exactly(scenario) -> None:
    r = scenario.results
    assert r["checkpoint_files"] == ["learner.json", "model", "optimizer"]
    assert (r["checkpoint_model"] / "tokenizer_config.json").is_file()
    assert r["b_version"] == 1 and r["b_v2"] == 2
    torch.testing.assert_close(r["b_logp1"], r["logp1"], atol=1e-6, rtol=0)
    exact = {k: v for k, v in r["m2"].items() if k != "peak_memory_mb"}  # the process's
    assert {k: r["b_m2"][k] for k in exact} == pytest.approx(exact, rel=1e-6, abs=1e-7)
    # a fresh AdamW (optimizer state not restored) would move the weights by ~lr here
    torch.testing.assert_close(r["b_w2"], r["w2"], atol=1e-6, rtol=0)
    checkpoint_model = load_model(r["checkpoint_model"]).state_dict()
    torch.testing.assert_close(checkpoint_model, r["w1"], atol=0, rtol=0)


def test_a_rank_that_sees_a_file_unlike_the_manifest_loads_nothing(scenario) -> None:
    r = scenario.results
    assert "model/model.safetensors: SHA-256 differs" in r["rejected_error"]
    assert "nothing was loaded" in r["rejected_error"]
    assert r["rejected_version"] == 0  # and the same group then loaded the checkpoint


def test_a_full_disk_during_a_save_comes_back_as_the_operator_error(scenario) -> None:
    """The rank's ENOSPC (safetensors' text error, or dcp's per-rank failures) crosses Ray as
    CheckpointWriteError, not as a learner failure."""
    error = scenario.results["full_error"]
    assert error.errno == errno.ENOSPC
    assert "[ENOSPC]" in str(error) and "Not a learner failure" in str(error)
    assert "free on that filesystem" in str(error)


def test_update_rejects_empty_and_odd_batches(scenario) -> None:
    assert "empty batch" in scenario.results["empty_error"]
    assert "even" in scenario.results["odd_error"]


def test_reference_logprobs_without_a_kl_loss_are_refused(scenario) -> None:
    assert "algorithm.kl_coef is 0.0" in scenario.results["no_reference_error"]


def test_old_logprobs_may_be_omitted_only_for_a_single_optimizer_step(scenario) -> None:
    """m1 (no old log-probs given) matched the reference that passed them (the weights
    test above); an update of two mini-batches refuses to go without them."""
    r = scenario.results
    assert r["single_step"] == (True, False)
    assert "2 mini-batches" in r["no_old_error"] and "compute_logprobs" in r["no_old_error"]


def test_deepspeed_zero2_update_equals_fsdp2(scenario, reference, tmp_path) -> None:
    group = LearnerGroup(make_config("deepspeed", zero_stage=2), scenario.model_path)
    try:
        logp0 = group.compute_logprobs(scenario.batch1)
        metrics = group.update(scenario.batch1, logp0)
        version, ref = group.publish_weights()
        weights = ray.get(ref)
        group.save_checkpoint(tmp_path)
        group.load_checkpoint(tmp_path, file_digests(tmp_path))
        after_load = group.compute_logprobs(scenario.batch2)
    finally:
        group.shutdown()
    torch.testing.assert_close(logp0, reference["logp0"], atol=1e-5, rtol=0)
    assert version == 1
    assert metrics["grad_norm"] == pytest.approx(reference["norms1"][0], rel=1e-4)
    assert_weights_close(weights, reference["w1"])
    torch.testing.assert_close(after_load, reference["logp1"], atol=1e-5, rtol=0)
