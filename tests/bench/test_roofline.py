"""bench/roofline.py: the model's FLOPs and bytes against a hand count on a tiny config and
its parameter count against the real model built from that config; the generation bound
and the breakdown's utilisation on hand numbers; and the script's JSON on a tiny, fast
setting (shape only: nothing here is timed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import breakdown  # noqa: E402
import roofline  # noqa: E402

# hidden 4, MLP 6, 1 layer, 2 query heads and 1 KV head of width 2, vocabulary 10.
# Layer weights: q 4x4 + k 4x2 + v 4x2 + o 4x4 + gate/up/down 3 x 4x6 = 16+8+8+16+72 = 120;
# LM head 4x10 = 40. Per position: 2 x 120 = 240 FLOPs of matmuls, attention (QK^T and AV)
# 4 x layers x heads x head_dim x context = 16 x context, and the LM head 2 x 40 = 80.
TINY: dict[str, Any] = {
    "hidden_size": 4,
    "intermediate_size": 6,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 2,
    "vocab_size": 10,
    "tie_word_embeddings": True,
}


def test_model_flops_by_hand() -> None:
    got = roofline.model_flops(TINY, prompt_tokens=2, response_tokens=2, dtype_bytes=2)
    assert got["params"] == 120 + 40 + (2 * 1 + 1) * 4  # layers, tied embedding, 3 norms
    # the learner's pass: 4 positions (contexts 1..4) through the layer, logits at the 2
    # response positions: 4*240 + 16*(1+2+3+4) + 2*80
    assert got["forward"] == 960 + 160 + 160
    assert got["train_step"] == 3 * 1280
    # the engine: the 2 prompt positions and the first token's logits, then response token
    # 2 at context 3 with its logits
    assert got["prefill"] == 2 * 240 + 16 * (1 + 2) + 80
    assert got["decode"] == 240 + 16 * 3 + 80
    assert got["decode_token"] == 240 + 16 * 3 + 80  # the mean decode context is 2 + 2/2
    assert got["weight_bytes"] == (120 + 40) * 2
    # K and V, 1 layer, 1 head of width 2, bf16, for the 3 positions that decode step reads
    assert got["kv_bytes"] == 2 * 1 * 1 * 2 * 2 * 3


def test_model_flops_without_a_response_has_no_decode() -> None:
    got = roofline.model_flops(TINY, prompt_tokens=3, response_tokens=0)
    assert got["decode"] == 0 and got["kv_bytes"] == 0
    assert got["forward"] == 3 * 240 + 16 * (1 + 2 + 3)  # no logits needed


@pytest.mark.parametrize("tied", [True, False])
def test_params_match_the_model_built_from_the_config(tied: bool) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**TINY, "tie_word_embeddings": tied})
    model = LlamaForCausalLM(config)
    real = sum(p.numel() for p in model.parameters())
    assert roofline.ModelShape.from_config(config).params == real
    assert roofline.model_flops(config, 2, 2)["params"] == real


def test_generation_bound_by_hand() -> None:
    # one prompt of 2 tokens, n = 2 responses of 2 tokens; 100 FLOP/s, 10 bytes/s
    got = roofline.generation_bound(TINY, [2], 2, 2.0, peak_flops=100.0, bandwidth=10.0)
    assert got["flops"] == 608 + 2 * 368  # prefill once, decode per response
    assert got["bytes"] == 320 + 2 * 24  # one decode step: the weights once, both KV caches
    assert got["prefill_s"] == pytest.approx(6.08)
    assert got["decode_compute_s"] == pytest.approx(7.36)
    assert got["decode_memory_s"] == pytest.approx(36.8)
    assert got["bound"] == "memory"
    assert got["bound_s"] == pytest.approx(6.08 + 36.8)
    assert got["tokens_per_s"] == pytest.approx(4 / 42.88)


def test_breakdown_step_utilisation_by_hand() -> None:
    cfg = SimpleNamespace(
        learner=SimpleNamespace(dtype="float32", ppo_epochs=1, num_ranks=2),
        rollout=SimpleNamespace(dtype="bfloat16", threads_per_worker=2, n=2),
    )
    roof = {
        "cpu": "test",
        "matmul": {
            "float32": {"1": {"peak_flops_per_s": 100.0}},
            "bfloat16": {"2": {"peak_flops_per_s": 100.0}},
        },
        "memory": {"2": {"bytes_per_s": 10.0, "copy_bytes_per_s": 5.0}},
    }
    m = {
        "time/update_s": 2.0,
        "time/old_logprobs_s": 4.0,
        "time/generate_s": 85.76,
        "time/weight_sync_s": 4.0,
        "rollout/response_len_mean": 2.0,
        "learner/old_logprobs_reused": 0.0,
    }
    # two trained rollouts of 2 + 2 tokens: forward 1280 each
    got = breakdown.step_utilisation(m, [(2, 2), (2, 2)], [2], cfg, TINY, roof)
    assert got["tokens_trained"] == 8
    assert got["update_flops"] == 3 * 2 * 1280
    assert got["update_mfu"] == pytest.approx(7680 / 2.0 / (2 * 100.0))
    assert got["old_logprobs_mfu"] == pytest.approx(2560 / 4.0 / (2 * 100.0))
    assert got["generate_roofline_share"] == pytest.approx(0.5)  # 42.88 s of 85.76
    assert got["generate_bound"] == "memory"
    assert got["weight_sync_bytes_per_s"] == 172 * 2 / 4.0  # the params in bf16
    assert got["weight_sync_memcpy_share"] == pytest.approx(172 * 2 / 4.0 / 5.0)

    reused = breakdown.step_utilisation(
        {**m, "learner/old_logprobs_reused": 1.0}, [(2, 2)], [2], cfg, TINY, None
    )
    assert reused["old_logprobs_flops"] == 0.0
    assert reused["update_mfu"] is None and reused["generate_roofline_share"] is None


def test_roofline_json_on_a_tiny_setting(tmp_path: Path) -> None:
    out = tmp_path / "roofline.json"
    tiny = ["--sizes", "16", "32", "--threads", "1", "2", "--min-s", "0.001"]
    tiny += ["--copy-mib", "1", "--no-model"]
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "roofline.py"), *tiny, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert [r["bench"] for r in lines] == ["roofline_matmul"] * 4 + ["roofline_memory"] * 2 + [
        "roofline"
    ]
    summary = json.loads(out.read_text())
    assert summary == lines[-1]
    assert "main_job" not in summary
    assert set(summary["matmul"]) == {"float32", "bfloat16"}
    for dtype in ("float32", "bfloat16"):
        for threads in (1, 2):
            got = summary["matmul"][dtype][str(threads)]
            assert set(got["by_size"]) == {"16", "32"}
            assert got["peak_flops_per_s"] == max(got["by_size"].values()) > 0
            assert got["by_size"][str(got["size"])] == got["peak_flops_per_s"]
            assert roofline.peak_flops(summary, dtype, threads) == got["peak_flops_per_s"]
    for threads in (1, 2):
        mem = summary["memory"][str(threads)]
        assert mem["mib"] == 1
        assert mem["bytes_per_s"] == pytest.approx(2 * mem["copy_bytes_per_s"])
        assert mem["bytes_per_s"] > 0
        assert roofline.memory_rate(summary, threads) == mem["bytes_per_s"]
    one = summary["matmul"]["bfloat16"]["1"]["peak_flops_per_s"]
    assert roofline.learner_peak(summary, "bfloat16", 2) == 2 * one  # one thread per rank
    assert roofline.peak_flops(summary, "float32", 4) is None
    assert roofline.memory_rate(summary, 4) is None
    assert roofline.load_roofline(out) == summary
    assert roofline.load_roofline(tmp_path / "absent.json") is None
    assert roofline.roofline_source(None)["path"] is None
