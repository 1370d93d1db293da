"""Helpers shared by the system benchmarks (``bench/rollout_overhead.py``,
``bench/breakdown.py``, ``bench/throughput.py``): the benchmark recipe, its prompts, and
summary statistics. Each benchmark prints one JSON object per result line."""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "bench" / "configs" / "arith_smollm2_cpu.yaml"


def bench_config(overrides: Sequence[str] = (), path: Path = CONFIG) -> Any:
    """The benchmark recipe (``bench/configs/arith_smollm2_cpu.yaml``) with ``overrides``."""
    from shuffle_r1.config import load_config

    return load_config(path, list(overrides))


def train_prompts(cfg: Any, count: int) -> list[Any]:
    """The first ``count`` training prompts of ``cfg`` (``shuffle_r1.data.splits.Prompt``:
    chat template applied, tokenised), in file order."""
    from transformers import AutoTokenizer

    from shuffle_r1.data.splits import load_prompt_splits
    from shuffle_r1.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.learner.model_path))
    train, _, _, _ = load_prompt_splits(cfg.data, tokenizer)
    if len(train) < count:
        raise ValueError(f"{cfg.data.train_path} has {len(train)} prompts, fewer than {count}")
    return train[:count]


def stats(values: Sequence[float]) -> dict[str, float]:
    """Median, mean, min and max of ``values`` (the benchmarks report medians)."""
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)
