"""Per-step metrics of a run: a JSONL file, the trainer's Prometheus exporter, PNG plots.

Every step's metrics are a flat ``name -> float`` dict, one JSON line per step, written
whole or not at all (:class:`MetricsWriter`). The Prometheus metrics are the ``trainer``
role of ``shuffle_r1.metric_catalog`` (fixed names, the ones the Grafana dashboard queries),
set from that dict.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import start_http_server

from shuffle_r1.integrity import OPERATOR_ERRNOS, OutputWriteError

log = logging.getLogger(__name__)

PLOTTED = (
    ("reward/mean", "mean reward"),
    ("reward/accuracy", "train accuracy"),
    ("val/accuracy", "validation accuracy (mean pass@1)"),
    ("learner/policy_loss", "policy loss"),
    ("diag/silence_ratio", "rollout-silence ratio"),
    ("diag/collapse_share_before_pts", "advantage-collapse share (before PTS)"),
    ("time/step_s", "step time (s)"),
)


class MetricsWriter:
    """Appends one JSON object per step (flat ``name -> float``) to ``path``, each line whole.

    A line goes out in ``os.write`` calls on an ``O_APPEND`` descriptor; if one fails part
    way (a full disk), the file is truncated back to its size before the line, so it always
    ends with a whole line. A file that does not (a process killed mid-line by an older
    version) is cut back to its last whole line when the writer opens it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            text = path.read_bytes()
            whole = text.rfind(b"\n") + 1
            if whole < len(text):
                log.warning(
                    "%s ended with a torn line (%d bytes without a newline); cut it off",
                    path,
                    len(text) - whole,
                )
                os.truncate(path, whole)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        """Append step ``step``'s row.

        Raises:
            OutputWriteError: the disk is full (or a quota, a size limit, permissions); the
                file is as it was before the call.
        """
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        data = memoryview((json.dumps(row) + "\n").encode())
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                done = 0
                while done < len(data):  # a full disk writes part, then fails
                    written = os.write(fd, data[done:])
                    if written == 0:
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
                    done += written
            except OSError as exc:
                os.ftruncate(fd, size)
                if exc.errno not in OPERATOR_ERRNOS:
                    raise
                raise OutputWriteError.wrap(
                    exc,
                    f"metrics of step {step}",
                    self.path,
                    "The line was not written (the file still ends with a whole line). Free "
                    "space, then continue with `shuffle-r1 train --resume`.",
                ) from exc
        finally:
            os.close(fd)


# step-metrics keys -> (catalog name, labels) of the gauges set from them each step
_GAUGES = {
    "rollout/tokens_per_s": ("shuffle_r1_rollout_tokens_per_second", {}),
    "rollout/truncated_share": ("shuffle_r1_rollout_truncated_share", {}),
    "reward/mean": ("shuffle_r1_reward_mean", {"split": "train"}),
    "reward/accuracy": ("shuffle_r1_reward_accuracy", {"split": "train"}),
    "reward/format": ("shuffle_r1_reward_format", {"split": "train"}),
    "val/reward": ("shuffle_r1_reward_mean", {"split": "val"}),
    "val/accuracy": ("shuffle_r1_reward_accuracy", {"split": "val"}),
    "val/format": ("shuffle_r1_reward_format", {"split": "val"}),
    "diag/collapse_share_before_pts": (
        "shuffle_r1_advantage_collapse_share",
        {"stage": "before_pts"},
    ),
    "diag/collapse_share_after_abs": (
        "shuffle_r1_advantage_collapse_share",
        {"stage": "after_abs"},
    ),
    "diag/silence_ratio": ("shuffle_r1_rollout_silence_ratio", {}),
    "weight_version": ("shuffle_r1_weight_version", {}),
    "learner/policy_loss": ("shuffle_r1_learner_policy_loss", {}),
    "learner/grad_norm": ("shuffle_r1_learner_grad_norm", {}),
    "learner/clip_fraction": ("shuffle_r1_learner_clip_fraction", {}),
    "learner/kl": ("shuffle_r1_learner_kl", {}),
    "learner/behaviour_imp_weight": ("shuffle_r1_learner_behaviour_imp_weight", {}),
    "learner/behaviour_truncated_fraction": (
        "shuffle_r1_learner_behaviour_truncated_fraction",
        {},
    ),
    "learner/positions_per_token": ("shuffle_r1_learner_positions_per_token", {}),
}
# step-metrics keys in another unit than their gauge's: key -> (gauge, factor)
_SCALED_GAUGES = {"learner/peak_memory_mb": ("shuffle_r1_learner_peak_memory_bytes", 2.0**20)}
# step-metrics keys -> catalog counters incremented by their value each step
_COUNTERS = {
    "rollout/tokens": "shuffle_r1_rollout_tokens_total",
    "buffer/pairs_kept": "shuffle_r1_pts_pairs_kept_total",
    "buffer/pairs_dropped": "shuffle_r1_pts_pairs_dropped_total",
    "buffer/pairs_drawn": "shuffle_r1_abs_pairs_drawn_total",
    "buffer/shortfall": "shuffle_r1_abs_shortfall_total",
    "learner/skipped_update": "shuffle_r1_skipped_updates_total",
}
PHASES = (
    "generate",
    "rollout_sync",
    "reward",
    "buffer",
    "old_logprobs",
    "update",
    "publish",
    "eval",
)
# The handled failures the trainer counts (role, kind); their series exist from the start at 0.
ERROR_KINDS = (
    ("data", "skipped_rows"),
    ("data", "overlong_prompts"),
    ("rollout", "resent"),
    ("reward", "hung"),
    ("reward", "raised"),
    ("buffer", "reconnect"),
    ("buffer", "regenerated_step"),
    ("learner", "rebuilt"),
)


class TrainerExporter:
    """The trainer's Prometheus metrics (the ``trainer`` role of
    ``shuffle_r1.metric_catalog``), served on ``http://host:port/metrics``.

    :meth:`observe_step` sets them from a step's metrics dict (the keys the trainer writes to
    ``metrics.jsonl``) plus the per-rollout advantages and per-pair ABS draw counts;
    :meth:`count_error` counts a handled failure; :meth:`set_live_workers` and
    :meth:`track_queue_depth` read live values at scrape time. ``port`` 0 exports nothing
    (the metrics still exist in the registry, for tests).
    """

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        from shuffle_r1.metric_catalog import (
            ADVANTAGE_BUCKETS,
            SECONDS_BUCKETS,
            STALENESS_BUCKETS,
            by_role,
        )

        self.registry = CollectorRegistry()
        self.metrics: dict[str, Any] = {}
        for spec in by_role("trainer"):
            kw: dict[str, Any] = {"labelnames": spec.labels, "registry": self.registry}
            if spec.kind == "counter":
                metric: Any = Counter(spec.name, spec.help, **kw)
            elif spec.kind == "gauge":
                metric = Gauge(spec.name, spec.help, **kw)
            else:
                buckets = {
                    "shuffle_r1_advantage": ADVANTAGE_BUCKETS,
                    "shuffle_r1_abs_pair_draws": tuple(range(0, 17)),
                    "shuffle_r1_rollout_staleness": STALENESS_BUCKETS,
                }.get(spec.name, SECONDS_BUCKETS)
                metric = Histogram(spec.name, spec.help, buckets=buckets, **kw)
            self.metrics[spec.name] = metric
        for phase in PHASES:  # labelled series exist from the start, at 0
            self.metrics["shuffle_r1_phase_seconds"].labels(phase)
        for role, kind in ERROR_KINDS:
            self.metrics["shuffle_r1_errors_total"].labels(role, kind)
        for side in ("producer", "consumer"):
            self.metrics["shuffle_r1_idle_seconds_total"].labels(side)
        self._server: Any = None
        if port:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
            log.info("trainer metrics on http://%s:%d/metrics", host, port)

    def observe_step(
        self,
        steps_done: int,
        metrics: Mapping[str, float],
        advantages: Sequence[float] = (),
        pair_draws: Sequence[int] = (),
        staleness: Sequence[int] = (),
    ) -> None:
        """Set the metrics from a step's (or an evaluation's) metrics dict; ``steps_done`` is
        the number of training steps completed, ``advantages`` the step's per-rollout GRPO
        advantages before PTS, ``pair_draws`` how often ABS drew each of its kept pairs,
        ``staleness`` how many weight versions each of its rollouts lags the policy."""
        m = self.metrics
        m["shuffle_r1_trainer_step"].set(steps_done)
        if "time/step_s" in metrics:
            m["shuffle_r1_step_seconds"].observe(metrics["time/step_s"])
        for phase in PHASES:
            value = metrics.get(f"time/{phase}_s")
            if value is not None:
                m["shuffle_r1_phase_seconds"].labels(phase).observe(value)
        if "time/weight_sync_s" in metrics:
            m["shuffle_r1_weight_sync_seconds"].observe(metrics["time/weight_sync_s"])
        for key, (name, labels) in _GAUGES.items():
            value = metrics.get(key)
            if value is not None and math.isfinite(value):
                (m[name].labels(**labels) if labels else m[name]).set(value)
        for key, (name, factor) in _SCALED_GAUGES.items():
            value = metrics.get(key)
            if value is not None and math.isfinite(value):
                m[name].set(value * factor)
        for key, name in _COUNTERS.items():
            value = metrics.get(key)
            if value:
                m[name].inc(value)
        for a in advantages:
            m["shuffle_r1_advantage"].observe(a)
        for draws in pair_draws:
            m["shuffle_r1_abs_pair_draws"].observe(draws)
        for lag in staleness:
            m["shuffle_r1_rollout_staleness"].observe(lag)
        for side in ("producer", "consumer"):
            idle = metrics.get(f"time/{side}_idle_s")
            if idle:
                m["shuffle_r1_idle_seconds_total"].labels(side).inc(idle)

    def count_error(self, role: str, kind: str, amount: float = 1.0) -> None:
        if amount > 0:
            self.metrics["shuffle_r1_errors_total"].labels(role, kind).inc(amount)

    def set_live_workers(self, role: str, read: Callable[[], float]) -> None:
        """Report ``read()`` as the live workers of ``role`` at each scrape."""
        self.metrics["shuffle_r1_live_workers"].labels(role).set_function(_safe(read))

    def track_queue_depth(self, read: Callable[[], float]) -> None:
        self.metrics["shuffle_r1_rollout_queue_depth"].set_function(_safe(read))

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _safe(read: Callable[[], float]) -> Callable[[], float]:
    """A scrape-time reader that reports NaN instead of failing the whole scrape."""

    def value() -> float:
        try:
            return float(read())
        except Exception:  # a role being restarted: say "unknown", keep serving the rest
            return math.nan

    return value


def _plain(value: object) -> object:
    if hasattr(value, "item"):
        value = value.item()  # a 0-d tensor
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    return value


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a per-step JSONL file (``metrics.jsonl``, ``prompts.jsonl``), by step; the
    last row of a step wins (a resumed or rebuilt run writes a step again). A torn last line
    (no newline: a write cut short) is skipped with a warning.

    Raises:
        ValueError: a line before the last is not a JSON object with a ``step`` (the file is
            damaged), naming the file and the line.
    """
    text = path.read_text()
    lines = text.split("\n")
    if lines[-1]:
        log.warning("%s: skipping a torn last line (%d chars, no newline)", path, len(lines[-1]))
    rows: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(lines[:-1], start=1):
        if line.strip():
            try:
                row = json.loads(line)
                rows[int(row["step"])] = row
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}, line {number}: not a metrics row ({exc})") from exc
    return [rows[s] for s in sorted(rows)]


def wilson_interval(share: float, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% for ``z`` = 1.96) of a binomial proportion ``share``
    observed over ``trials``; ``(0.0, 1.0)`` with no trials."""
    if trials <= 0:
        return (0.0, 1.0)
    denom = 1 + z * z / trials
    centre = (share + z * z / (2 * trials)) / denom
    half = z * math.sqrt(share * (1 - share) / trials + z * z / (4 * trials * trials)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def plot_metrics(path: Path, out: Path) -> Path:
    """Draw the curves of :data:`PLOTTED` that the run has into one PNG; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    present = [(k, t) for k, t in PLOTTED if any(r.get(k) is not None for r in rows)]
    cols = 2
    nrows = max(1, math.ceil(len(present) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(10, 3 * nrows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, present, strict=False):
        # x: training steps done (a row's step is the 0-based step it ends; -1 = before any)
        pts = [(r["step"] + 1, r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("training steps done")
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def held_out_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Held-out accuracy before training (the ``step`` -1 row) and at the last evaluation,
    each with its 95% Wilson interval, from ``metrics.jsonl``'s rows; ``None`` when the run
    has no evaluation. Keys: ``n_eval`` (samples per evaluation), ``acc_before``,
    ``acc_before_ci``, ``acc_after``, ``acc_after_ci``, ``after_step`` (training steps done at
    the last evaluation), ``gain``. The interval treats the samples as independent trials,
    exact for one sample per problem (``rollout.val_n=1``), too narrow for more."""
    evals = [r for r in rows if r.get("val/accuracy") is not None]
    if not evals:
        return None
    first, last = evals[0], evals[-1]
    n = int(last.get("val/samples") or 0)
    out: dict[str, Any] = {"n_eval": n}
    if first["step"] == -1:
        out["acc_before"] = first["val/accuracy"]
        out["acc_before_ci"] = wilson_interval(first["val/accuracy"], n)
    out["acc_after"] = last["val/accuracy"]
    out["acc_after_ci"] = wilson_interval(last["val/accuracy"], n)
    out["after_step"] = int(last["step"]) + 1
    if "acc_before" in out and last is not first:
        out["gain"] = out["acc_after"] - out["acc_before"]
    return out


def named_score_means(scores: Sequence[Any]) -> dict[str, float]:
    """``reward/<name>``: the mean of each named score the reward functions returned
    (``RewardResult.scores``) over the rollouts that have it, except ``accuracy`` and
    ``format``, which ``reward/accuracy`` and ``reward/format`` report over every rollout."""
    totals: dict[str, list[float]] = {}
    for s in scores:
        for name, value in s.scores.items():
            if name not in ("accuracy", "format"):
                totals.setdefault(name, []).append(value)
    return {f"reward/{name}": sum(v) / len(v) for name, v in sorted(totals.items())}


def step_metrics(
    scores: Sequence[Any],
    gen: Any,
    put: Any,
    sample: Any,
    advantages: Any,
    collapse_tau: float,
) -> dict[str, float]:
    """The ``reward/``, ``rollout/``, ``buffer/`` and ``diag/`` metrics of a step (README
    "Observability") from its scores (``actors.reward``), its generation result
    (``actors.rollout``), the buffer's put and sample responses and the GRPO advantages
    ``(N,)`` of every generated rollout (for the collapse share before PTS, §5)."""
    from shuffle_r1.algos import advantage_collapse_share

    rewards = [s.reward for s in scores]
    completions = gen.completions
    return {
        **named_score_means(scores),
        "reward/mean": sum(rewards) / len(rewards),
        "reward/accuracy": sum(s.accuracy for s in scores) / len(scores),
        "reward/format": sum(s.format for s in scores) / len(scores),
        "reward/errors": float(sum(s.error is not None for s in scores)),
        "rollout/tokens": float(gen.tokens),
        "rollout/tokens_per_s": gen.tokens / max(gen.generate_s, 1e-9),
        "rollout/response_len_mean": gen.tokens / len(completions),
        "rollout/truncated_share": sum(c.finish_reason == "length" for c in completions)
        / len(completions),
        "rollout/weight_version": float(min(c.weight_version for c in completions)),
        "rollout/resent": float(gen.resent),
        "rollout/workers": float(len(gen.served)),
        "buffer/pairs_kept": float(put.pairs_kept),
        "buffer/pairs_dropped": float(put.pairs_dropped),
        "buffer/batch_rollouts": float(len(sample.items)),
        "buffer/pairs_drawn": float(len(sample.items) // 2 if sample.pairs_total else 0),
        "buffer/shortfall": float(sample.shortfall),
        "buffer/stale_dropped": float(put.stale + sample.stale_dropped),
        "diag/collapse_share_before_pts": advantage_collapse_share(advantages, collapse_tau),
        "diag/collapse_share_after_abs": sample.advantage_collapse_share,
        "diag/silence_ratio": sample.rollout_silence_ratio,
    }
