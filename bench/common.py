"""Helpers shared by the system benchmarks (``bench/rollout_overhead.py``,
``bench/breakdown.py``, ``bench/throughput.py``): the benchmark recipe, its prompts, and
summary statistics. Each benchmark prints one JSON object per result line. The sweeps
(``bench/algorithms.py``, ``bench/async.py``) share :func:`train_run`, :func:`run_missing`
and :func:`read_step_rows`."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
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


def train_run(config: Path, overrides: Sequence[str], folder: Path) -> None:
    """Train one sweep run of ``config`` with ``overrides`` (which set its output folder,
    ``folder``) and write ``folder/done.json`` last: steps, wall and setup seconds. A reaper
    stops whatever the run started if the sweep is stopped mid-run."""
    from services.trainer.loop import Trainer
    from services.trainer.reaper import start_reaper
    from shuffle_r1.config import load_config

    start_reaper()
    cfg = load_config(config, list(overrides))
    started = time.perf_counter()
    with Trainer(cfg) as trainer:  # evaluates before the first update (step -1's row)
        setup_s = time.perf_counter() - started
        summary = trainer.run()
    done = {"steps": summary.steps, "wall_s": time.perf_counter() - started, "setup_s": setup_s}
    (folder / "done.json").write_text(json.dumps(done))


def run_missing(runs: Sequence[tuple[Path, list[str]]], steps: int) -> int:
    """Run each ``(folder, command)`` of a sweep in turn, in ``folder`` (its output in
    ``folder/run.log``), unless ``folder/done.json`` (written last by a complete run) says it
    trained ``steps`` steps already; a folder left by an interrupted run loses its
    ``metrics.jsonl``, ``prompts.jsonl`` and ``summary.json`` first. Returns how many
    commands failed."""
    failed = 0
    for folder, cmd in runs:
        done = folder / "done.json"
        if done.is_file() and json.loads(done.read_text())["steps"] >= steps:
            print(f"[sweep] {folder.name}: complete, skipped", flush=True)
            continue
        if folder.exists():  # an interrupted run: start it again from nothing
            for stale in ("metrics.jsonl", "prompts.jsonl", "summary.json"):
                (folder / stale).unlink(missing_ok=True)
        folder.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        with (folder / "run.log").open("w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        print(f"[sweep] {folder.name}: rc={rc} in {time.perf_counter() - t:.0f} s", flush=True)
        failed += rc != 0
    return failed


def read_step_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` / ``prompts.jsonl``, one per step in step order (the
    last row of a step wins: a resumed or re-run step)."""
    rows: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]
