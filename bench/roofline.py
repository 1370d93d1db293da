"""The machine's limit: peak matmul FLOP/s and memory bandwidth, and the model's FLOPs (#17).

What the learner and the engine do is mostly dense matmuls (the learner in its dtype, one
thread per rank; the engine in its dtype on ``rollout.threads_per_worker`` threads) and,
when decoding, reading every weight once per step. So this measures, with torch:

- ``matmul``: ``torch.mm`` of two square ``n x n`` matrices for each ``--sizes`` n (the
  model's widths: 576 hidden, 1536 MLP), per dtype and per thread count, ``2 n^3 / t`` with
  ``t`` the best of repeated calls over at least ``--min-s`` seconds; the peak is the best
  size;
- ``memory``: ``dst.copy_(src)`` of a ``--copy-mib`` MiB tensor (well past the caches), per
  thread count: ``copy_bytes_per_s`` is the bytes copied per second (a memcpy's rate) and
  ``bytes_per_s`` the bytes moved (read + write, twice that);
- ``main_job``: from the main recipe's (``configs/arith_smollm2_cpu.yaml``) model shapes
  (its ``config.json``), the FLOPs of a training step and of a step's generation
  (:func:`model_flops`), and the time each would take at the measured peaks.

Prints one JSON line per measurement and the summary last, which ``--out`` also gets
(``bench/results/roofline.json``); the other benchmarks read it (:func:`load_roofline`) and
report their utilisation, achieved / peak, against it.

    python bench/roofline.py [--out bench/results/roofline.json] [--sizes 576 1024 1536 2048]
        [--threads 1 2] [--min-s 1.0] [--copy-mib 512] [--no-model]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common import ROOT, bench_config, emit, train_prompts

RESULT = ROOT / "bench" / "results" / "roofline.json"
MAIN_RECIPE = ROOT / "configs" / "arith_smollm2_cpu.yaml"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


# ---- the model's FLOPs ------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer's sizes, from its ``config.json`` (Llama / Qwen2 names)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> ModelShape:
        """From a ``config.json`` mapping or a transformers ``PretrainedConfig``."""
        c = config if isinstance(config, Mapping) else config.to_dict()
        heads = c["num_attention_heads"]
        return cls(
            hidden=c["hidden_size"],
            intermediate=c["intermediate_size"],
            layers=c["num_hidden_layers"],
            heads=heads,
            kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            vocab=c["vocab_size"],
            tied=bool(c.get("tie_word_embeddings", True)),
        )

    @property
    def layer_matmul_params(self) -> int:
        """Weights every token multiplies in the decoder layers: q, k, v, o and the gated
        MLP's gate, up and down, times the layers."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        per_layer = self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate
        return self.layers * per_layer

    @property
    def params(self) -> int:
        """All parameters: the layers' matmuls, the embedding (and an untied LM head), and
        the RMSNorm weights (two per layer and the final one). No biases."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = (2 * self.layers + 1) * self.hidden
        return self.layer_matmul_params + embeddings + norms


def _layer_flops(shape: ModelShape, first: float, last: float) -> float:
    """FLOPs of the decoder layers for the positions whose causal context (keys attended,
    itself included) runs from ``first`` to ``last``: ``2 x weights`` per position for the
    matmuls and ``4 x heads x head_dim x context`` per layer for ``QK^T`` and ``AV``."""
    if last < first:
        return 0.0
    positions = last - first + 1
    context_sum = (first + last) * positions / 2
    attention = 4 * shape.layers * shape.heads * shape.head_dim * context_sum
    return 2 * shape.layer_matmul_params * positions + attention


def model_flops(
    config: Mapping[str, Any] | Any,
    prompt_tokens: float,
    response_tokens: float,
    dtype_bytes: int = 2,
) -> dict[str, float]:
    """FLOPs (and a decode step's bytes) of one sequence of ``prompt_tokens`` (P) +
    ``response_tokens`` (R) tokens, counted from the shapes (multiply-add = 2 FLOPs; causal
    attention counts the keys each position attends to, not a masked square; norms,
    activations and softmax left out). A mean length may be passed as a float.

    Returns:
        ``params``; ``forward``: the learner's pass (old log-probs): all P + R positions
        through the layers, the LM head (``2 x hidden x vocab``) at the R positions whose
        log-probs it needs (``shuffle_r1.training.token_logprobs``); ``train_step``: 3 x
        forward (backward = 2 x forward); ``prefill``: the engine's P prompt positions and
        the first response token's logits; ``decode``: the other R - 1 response tokens
        (context P + 1 .. P + R - 1), each through the layers and the LM head;
        ``decode_token``: one of those at the mean context P + R / 2;
        ``weight_bytes``: what one decode step reads of the weights (the layers' and the LM
        head's in ``dtype_bytes``), shared by every sequence decoded in that step;
        ``kv_bytes``: the KV cache this sequence's decode steps read, in all.
    """
    shape = ModelShape.from_config(config)
    p, r = float(prompt_tokens), float(response_tokens)
    head = 2 * shape.hidden * shape.vocab
    forward = _layer_flops(shape, 1, p + r) + r * head
    decoded = max(r - 1, 0.0)
    weights = shape.layer_matmul_params + shape.vocab * shape.hidden  # layers + LM head
    kv_per_position = 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes
    return {
        "params": float(shape.params),
        "forward": forward,
        "train_step": 3 * forward,
        "prefill": _layer_flops(shape, 1, p) + head,
        "decode": _layer_flops(shape, p + 1, p + decoded) + decoded * head,
        "decode_token": _layer_flops(shape, p + r / 2, p + r / 2) + head,
        "weight_bytes": float(weights * dtype_bytes),
        "kv_bytes": kv_per_position * (2 * p + decoded + 1) * decoded / 2,
    }


def generation_bound(
    config: Mapping[str, Any] | Any,
    prompt_lens: Sequence[float],
    n: int,
    response_mean: float,
    peak_flops: float,
    bandwidth: float,
    dtype_bytes: int = 2,
) -> dict[str, Any]:
    """The least time a rollout phase could take at ``peak_flops`` FLOP/s and ``bandwidth``
    bytes/s (read + write): ``n`` responses of ``response_mean`` tokens to each prompt of
    ``prompt_lens`` tokens, all decoded together. Each prompt is prefilled once (its n
    samples share it) at the FLOP peak; the ``response_mean - 1`` decode steps take the
    longer of their FLOPs at the peak and their bytes (the weights once a step plus every
    sequence's KV cache) at the bandwidth.

    Returns:
        ``flops``, ``bytes`` (decode), ``prefill_s``, ``decode_compute_s``,
        ``decode_memory_s``, ``bound_s`` (prefill + the longer decode side), ``bound``
        (``"compute"`` or ``"memory"``: which side limits decoding) and ``tokens_per_s``
        (the generated tokens over ``bound_s``).
    """
    costs = [model_flops(config, p, response_mean, dtype_bytes) for p in prompt_lens]
    prefill = sum(c["prefill"] for c in costs)
    decode = n * sum(c["decode"] for c in costs)
    steps = max(response_mean - 1, 0.0)
    moved = steps * costs[0]["weight_bytes"] + n * sum(c["kv_bytes"] for c in costs)
    compute_s, memory_s = decode / peak_flops, moved / bandwidth
    bound_s = prefill / peak_flops + max(compute_s, memory_s)
    return {
        "flops": prefill + decode,
        "bytes": moved,
        "prefill_s": prefill / peak_flops,
        "decode_compute_s": compute_s,
        "decode_memory_s": memory_s,
        "bound_s": bound_s,
        "bound": "compute" if compute_s >= memory_s else "memory",
        "tokens_per_s": n * len(prompt_lens) * response_mean / bound_s,
    }


def load_model_config(model_path: str) -> dict[str, Any]:
    """``config.json`` of ``learner.model_path`` (as the project resolves it)."""
    from shuffle_r1.models import resolve_model_path

    return dict(json.loads((resolve_model_path(model_path) / "config.json").read_text()))


# ---- reading the roofline back ----------------------------------------------------------


def load_roofline(path: Path = RESULT) -> dict[str, Any] | None:
    """The summary :func:`main` wrote, or None where it has not been run."""
    return json.loads(path.read_text()) if path.is_file() else None


def peak_flops(roofline: Mapping[str, Any], dtype: str, threads: int) -> float | None:
    """The measured matmul peak for ``dtype`` on ``threads`` threads; None if not measured."""
    got = roofline["matmul"].get(dtype, {}).get(str(threads))
    return None if got is None else float(got["peak_flops_per_s"])


def learner_peak(roofline: Mapping[str, Any], dtype: str, ranks: int) -> float | None:
    """The learner's peak: each rank is a process of one thread (Ray's ``num_cpus=1``), so
    ``ranks`` times the one-thread matmul peak in its dtype; None if not measured."""
    one = peak_flops(roofline, dtype, 1)
    return None if one is None else one * ranks


def memory_rate(
    roofline: Mapping[str, Any], threads: int, key: str = "bytes_per_s"
) -> float | None:
    """The measured copy rate on ``threads`` threads: ``bytes_per_s`` (read + write) or
    ``copy_bytes_per_s`` (bytes copied, a memcpy's rate); None if not measured."""
    got = roofline["memory"].get(str(threads))
    return None if got is None else float(got[key])


def roofline_source(roofline: Mapping[str, Any] | None, path: Path = RESULT) -> dict[str, Any]:
    """What a benchmark's utilisation is measured against, for its result line."""
    if roofline is None:
        return {"path": None, "note": f"{path.relative_to(ROOT)} absent: run bench/roofline.py"}
    return {"path": str(path.relative_to(ROOT)), "cpu": roofline["cpu"]}


# ---- measuring --------------------------------------------------------------------------


def _best_seconds(call: Any, min_s: float, min_calls: int = 3) -> float:
    """The fastest of repeated ``call()``s, after one untimed, over ``min_s`` seconds."""
    call()
    best, spent, calls = float("inf"), 0.0, 0
    while spent < min_s or calls < min_calls:
        t = time.perf_counter()
        call()
        took = time.perf_counter() - t
        best, spent, calls = min(best, took), spent + took, calls + 1
    return best


def matmul_peak(sizes: Sequence[int], dtype: str, threads: int, min_s: float) -> dict[str, Any]:
    """``torch.mm`` FLOP/s of square matrices of each size on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    by_size = {}
    kind = getattr(torch, dtype)
    for n in sizes:
        a, b = torch.randn(n, n, dtype=kind), torch.randn(n, n, dtype=kind)
        out = torch.empty(n, n, dtype=kind)
        seconds = _best_seconds(lambda a=a, b=b, o=out: torch.mm(a, b, out=o), min_s)
        by_size[str(n)] = 2 * n**3 / seconds
    best = max(by_size, key=by_size.__getitem__)
    return {"peak_flops_per_s": by_size[best], "size": int(best), "by_size": by_size}


def copy_rate(mib: int, threads: int, min_s: float) -> dict[str, Any]:
    """``dst.copy_(src)`` of ``mib`` MiB on ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    nbytes = mib * 2**20
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), min_s)
    return {"mib": mib, "copy_bytes_per_s": nbytes / seconds, "bytes_per_s": 2 * nbytes / seconds}


def main_job(summary: Mapping[str, Any], recipe: Path = MAIN_RECIPE) -> dict[str, Any]:
    """The main recipe's training step and rollout phase in FLOPs, at full-length responses
    (``rollout.max_response_length``) and the mean prompt length of the first 256 training
    prompts, with the least time each takes at the measured peaks (the learner's:
    :func:`learner_peak`; the engine's on its threads)."""
    from shuffle_r1.precision import resolve_dtype

    cfg = bench_config(path=recipe)
    config = load_model_config(cfg.learner.model_path)
    shape = ModelShape.from_config(config)
    prompts = train_prompts(cfg, 256)
    p = statistics.fmean(len(q.token_ids) for q in prompts)
    r = float(cfg.rollout.max_response_length)
    n, batch = cfg.rollout.n, cfg.trainer.rollout_batch_size
    # PTS keeps keep_ratio of each group (pairs), ABS re-draws as many; GRPO trains on all.
    kept = n if cfg.algorithm.name == "grpo" else round(cfg.algorithm.keep_ratio * n)
    learner_dtype = resolve_dtype(cfg.learner.dtype, cuda=False).dtype
    engine_dtype = resolve_dtype(cfg.rollout.dtype, cuda=False).dtype
    per_seq = model_flops(config, p, r, DTYPE_BYTES[engine_dtype])
    out: dict[str, Any] = {
        "recipe": str(recipe.relative_to(ROOT)),
        "model": cfg.learner.model_path,
        "shape": asdict(shape),
        "params": shape.params,
        "prompt_tokens_mean": p,
        "response_tokens": r,
        "prompts": batch,
        "n": n,
        "trained_rollouts": kept * batch,
        "learner_dtype": learner_dtype,
        "engine_dtype": engine_dtype,
        "per_sequence": per_seq,
        "train_step_flops": kept * batch * per_seq["train_step"] * cfg.learner.ppo_epochs,
        "generation_flops": batch * per_seq["prefill"] + batch * n * per_seq["decode"],
        # one decode step of the whole batch: every rollout generates one token
        "decode_step_flops": batch * n * per_seq["decode_token"],
        "decode_step_bytes": per_seq["weight_bytes"]
        + batch * n * per_seq["kv_bytes"] / max(r - 1, 1.0),
    }
    learner = learner_peak(summary, learner_dtype, cfg.learner.num_ranks)
    engine_peak = peak_flops(summary, engine_dtype, cfg.rollout.threads_per_worker)
    bandwidth = memory_rate(summary, cfg.rollout.threads_per_worker)
    if learner:
        out["train_step_bound_s"] = out["train_step_flops"] / learner
    if engine_peak and bandwidth:
        out["generation_bound"] = generation_bound(
            config, [p] * batch, n, r, engine_peak, bandwidth, DTYPE_BYTES[engine_dtype]
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[576, 1024, 1536, 2048])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=DTYPE_BYTES)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--min-s", type=float, default=1.0, help="seconds of calls per measurement")
    p.add_argument("--copy-mib", type=int, default=512)
    p.add_argument("--out", type=Path, help="also write the summary here")
    p.add_argument("--no-model", action="store_true", help="leave out the main job's FLOPs")
    args = p.parse_args()

    import torch

    from shuffle_r1.precision import NATIVE_BF16_FLAGS, cpu_description, cpu_flags

    shown = {"avx2", "avx512f", "amx_tile"} | NATIVE_BF16_FLAGS
    summary: dict[str, Any] = {
        "bench": "roofline",
        "cpu": cpu_description(),
        "cpu_flags": sorted(shown & cpu_flags()),
        "torch": torch.__version__,
        "matmul": {},
        "memory": {},
    }
    for dtype in args.dtypes:
        for threads in args.threads:
            got = matmul_peak(args.sizes, dtype, threads, args.min_s)
            summary["matmul"].setdefault(dtype, {})[str(threads)] = got
            emit({"bench": "roofline_matmul", "dtype": dtype, "threads": threads, **got})
    for threads in args.threads:
        got = copy_rate(args.copy_mib, threads, args.min_s)
        summary["memory"][str(threads)] = got
        emit({"bench": "roofline_memory", "threads": threads, **got})
    if not args.no_model:
        summary["main_job"] = main_job(summary)
    emit(summary)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
