"""``auto`` dtype resolution per device (shuffle_r1/precision.py) and its use by the config
and the trainer's ``resolve_precision``."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.trainer.bootstrap import resolve_precision
from shuffle_r1.config import ConfigError, load_config
from shuffle_r1.precision import cpu_description, cpu_flags, has_native_bf16, resolve_dtype

# flags as /proc/cpuinfo lists them on the machine kinds this project runs on
AVX2_ONLY = {"sse4_2", "avx", "avx2", "fma"}  # AMD EPYC (Zen 2/3) as lent here
AVX512_NO_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}  # Skylake/Ice Lake
AVX512_BF16 = AVX512_NO_BF16 | {"avx512_bf16"}  # Cooper Lake, AMD Zen 4
AMX = AVX512_BF16 | {"amx_bf16", "amx_tile", "amx_int8"}  # Sapphire Rapids


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (set(), "float32"),  # no flags readable (not Linux, or not x86)
        (AVX2_ONLY, "float32"),
        (AVX512_NO_BF16, "float32"),
        (AVX512_BF16, "bfloat16"),
        (AMX, "bfloat16"),
        (AVX2_ONLY | {"amx_bf16"}, "bfloat16"),
    ],
)
def test_auto_on_cpu_is_bf16_only_with_native_bf16_instructions(
    flags: set[str], expected: str
) -> None:
    choice = resolve_dtype("auto", cuda=False, flags=flags)
    assert choice.dtype == expected
    assert "native bf16" in choice.reason
    assert ("without" in choice.reason) == (expected == "float32")


@pytest.mark.parametrize("flags", [set(), AVX2_ONLY, AMX])
def test_auto_on_cuda_is_bf16_whatever_the_cpu(flags: set[str]) -> None:
    assert resolve_dtype("auto", cuda=True, flags=flags).dtype == "bfloat16"


@pytest.mark.parametrize("explicit", ["bfloat16", "float32"])
@pytest.mark.parametrize("flags", [AVX2_ONLY, AMX])
def test_an_explicit_dtype_wins(explicit: str, flags: set[str]) -> None:
    for cuda in (False, True):
        choice = resolve_dtype(explicit, cuda=cuda, flags=flags)
        assert (choice.dtype, choice.reason) == (explicit, "set explicitly")


def test_an_unknown_dtype_is_refused_by_the_resolver_and_the_config() -> None:
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype("float16", cuda=False, flags=AMX)
    with pytest.raises(ConfigError, match=r"rollout\.dtype"):
        load_config(None, ["rollout.dtype=fp32"])
    with pytest.raises(ConfigError, match=r"learner\.dtype"):
        load_config(None, ["learner.dtype=half"])


def test_cpu_flags_read_the_flags_line_of_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"
        "\nprocessor\t: 1\nflags\t\t: fpu\n"
    )
    assert cpu_flags(info) == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    assert has_native_bf16(cpu_flags(info))
    assert cpu_description(info).startswith("AMD EPYC 9R14, ")
    assert cpu_description(info).endswith("avx2 avx512f avx512_bf16")
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_this_machine_resolves_as_its_flags_say() -> None:
    choice = resolve_dtype("auto", cuda=False)
    assert choice.dtype == ("bfloat16" if has_native_bf16(cpu_flags()) else "float32")


def test_the_trainer_resolves_both_roles_and_keeps_explicit_values() -> None:
    cfg = load_config(None, ["learner.dtype=float32"])
    assert cfg.rollout.dtype == "auto"  # the default
    resolved, choices = resolve_precision(cfg)
    assert resolved.learner.dtype == "float32" and choices["learner"].reason == "set explicitly"
    assert resolved.rollout.dtype == resolve_dtype("auto", cuda=False).dtype
    on_gpu = load_config(None, ["rollout.num_gpus_per_worker=1", "learner.num_gpus_per_rank=1"])
    resolved, choices = resolve_precision(on_gpu)
    assert (resolved.learner.dtype, resolved.rollout.dtype) == ("bfloat16", "bfloat16")
    assert choices["rollout"].reason == "CUDA"
