"""Writes the Grafana dashboard ``shuffle-r1.json`` beside this file from the panels below.

    python deploy/grafana/dashboard.py           # write shuffle-r1.json
    python deploy/grafana/dashboard.py --check   # exit 1 if shuffle-r1.json is out of date

Every query uses the metric names of ``shuffle_r1/metric_catalog.py`` (the scrape configs in
``deploy/prometheus/`` strip Ray's ``ray_`` prefix); ``tests/deploy`` checks each name and
label against the catalog and that every catalog metric is on some panel. The Prometheus
datasource and the Kubernetes namespace are template variables.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().with_name("shuffle-r1.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
NS = 'namespace=~"$namespace"'
RATE = "[$__rate_interval]"


def m(name: str, labels: str = "") -> str:
    """A selector of ``shuffle_r1_<name>`` in the chosen namespaces."""
    return f"shuffle_r1_{name}{{{NS}{', ' + labels if labels else ''}}}"


def rate(name: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({m(name)}{RATE}))"


def increase(name: str, by: str = "") -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (increase({m(name)}{RATE}))"


def quantile(q: float, histogram: str, by: str = "") -> str:
    grouping = ", ".join(["le", *([by] if by else [])])
    return f"histogram_quantile({q}, sum by ({grouping}) (rate({m(histogram + '_bucket')}{RATE})))"


def mean(histogram: str, by: str = "") -> str:
    return f"{rate(histogram + '_sum', by)} / {rate(histogram + '_count', by)}"


Target = tuple[str, str]  # (PromQL, legend)
JSON = dict[str, Any]  # a Grafana JSON object (panel spec, panel, dashboard)


def ts(title: str, targets: list[Target], unit: str = "short", w: int = 8, **opts: Any) -> JSON:
    return {"type": "timeseries", "title": title, "targets": targets, "unit": unit, "w": w, **opts}


def stat(title: str, expr: str, unit: str = "short", w: int = 4) -> JSON:
    return {"type": "stat", "title": title, "targets": [(expr, "")], "unit": unit, "w": w}


def heatmap(title: str, histogram: str, w: int = 8) -> JSON:
    expr = f"sum by (le) (increase({m(histogram + '_bucket')}{RATE}))"
    return {
        "type": "heatmap",
        "title": title,
        "targets": [(expr, "{{le}}")],
        "unit": "short",
        "w": w,
    }


ROWS: list[tuple[str, list[JSON]]] = [
    (
        "Overview",
        [
            stat("Training step", f"max({m('trainer_step')})"),
            stat("Weight version", f"max({m('weight_version')})"),
            ts("Live workers per role", [(f"sum by (role) ({m('live_workers')})", "{{role}}")]),
            ts("Skipped updates", [(increase("skipped_updates_total"), "skipped")]),
        ],
    ),
    (
        "Step time",
        [
            ts(
                "Step time",
                [
                    (quantile(0.5, "step_seconds"), "p50"),
                    (quantile(0.9, "step_seconds"), "p90"),
                    (mean("step_seconds"), "mean"),
                ],
                unit="s",
            ),
            ts(
                "Time per phase (mean)",
                [(mean("phase_seconds", "phase"), "{{phase}}")],
                unit="s",
                stack=True,
            ),
            ts(
                "Weight sync",
                [
                    (quantile(0.5, "weight_sync_seconds"), "p50"),
                    (quantile(0.9, "weight_sync_seconds"), "p90"),
                ],
                unit="s",
            ),
        ],
    ),
    (
        "Asynchronous overlap",
        [
            heatmap("Rollout staleness (weight versions)", "rollout_staleness"),
            ts(
                "Idle share per side",
                [
                    (
                        f"sum by (side) (rate({m('idle_seconds_total')}{RATE}))",
                        "{{side}}",
                    )
                ],
                unit="percentunit",
            ),
            ts(
                "Staleness (mean)",
                [(mean("rollout_staleness"), "mean")],
            ),
        ],
    ),
    (
        "Rollout",
        [
            ts(
                "Rollout tokens/s",
                [
                    (f"sum({m('rollout_tokens_per_second')})", "last step"),
                    (rate("rollout_tokens_total"), "rate"),
                ],
            ),
            ts("Rollout queue depth", [(f"sum({m('rollout_queue_depth')})", "prompts")]),
            ts(
                "Truncated rollouts",
                [(f"max({m('rollout_truncated_share')})", "share")],
                unit="percentunit",
            ),
        ],
    ),
    (
        "Reward and accuracy",
        [
            ts("Reward", [(f"avg by (split) ({m('reward_mean')})", "{{split}}")]),
            ts(
                "Accuracy",
                [(f"avg by (split) ({m('reward_accuracy')})", "{{split}}")],
                unit="percentunit",
            ),
            ts(
                "Format reward",
                [(f"avg by (split) ({m('reward_format')})", "{{split}}")],
                unit="percentunit",
            ),
        ],
    ),
    (
        "Shuffle-R1 diagnostics (docs/algorithm.md §2, §3, §5)",
        [
            heatmap("Advantage distribution (before PTS)", "advantage"),
            ts(
                "Rollout silence ratio",
                [
                    (f"max({m('rollout_silence_ratio')})", "trainer"),
                    (f"max({m('buffer_rollout_silence_ratio')})", "buffer, last batch"),
                ],
                unit="percentunit",
            ),
            ts(
                "Advantage collapse",
                [
                    (f"max by (stage) ({m('advantage_collapse_share')})", "{{stage}}"),
                    (f"max({m('buffer_advantage_collapse_share')})", "buffer, last batch"),
                ],
                unit="percentunit",
            ),
            ts(
                "PTS pairs kept / dropped",
                [
                    (increase("pts_pairs_kept_total"), "kept"),
                    (increase("pts_pairs_dropped_total"), "dropped"),
                    (increase("buffer_pairs_kept_total"), "kept (buffer)"),
                    (increase("buffer_pairs_dropped_total"), "dropped (buffer)"),
                ],
            ),
            heatmap("ABS draws per kept pair", "abs_pair_draws"),
            ts(
                "ABS pairs drawn and shortfall",
                [
                    (increase("abs_pairs_drawn_total"), "drawn"),
                    (increase("abs_shortfall_total"), "shortfall"),
                    (increase("buffer_abs_shortfall_total"), "shortfall (buffer)"),
                ],
            ),
        ],
    ),
    (
        "Replay buffer",
        [
            ts(
                "Buffer size",
                [
                    (f"sum by (run) ({m('buffer_groups_stored')})", "groups {{run}}"),
                    (f"sum by (run) ({m('buffer_rollouts_stored')})", "rollouts {{run}}"),
                ],
            ),
            ts(
                "Groups put by outcome",
                [(rate("buffer_groups_put_total", "outcome"), "{{outcome}}")],
                unit="ops",
            ),
            ts(
                "RPCs by method and code",
                [(rate("buffer_requests_total", "method, code"), "{{method}} {{code}}")],
                unit="reqps",
            ),
            ts(
                "RPC latency p99",
                [(quantile(0.99, "buffer_request_seconds", "method"), "{{method}}")],
                unit="s",
            ),
            ts(
                "Sampling",
                [
                    (rate("buffer_samples_total"), "batches"),
                    (rate("buffer_items_sampled_total"), "items"),
                    (rate("buffer_skipped_batches_total"), "empty batches"),
                ],
                unit="ops",
            ),
            ts(
                "Stale drops and evictions",
                [
                    (increase("buffer_stale_dropped_total", "where"), "stale ({{where}})"),
                    (increase("buffer_evicted_steps_total"), "steps evicted"),
                    (increase("buffer_evicted_groups_total"), "groups evicted"),
                ],
            ),
        ],
    ),
    (
        "Errors",
        [
            ts(
                "Handled failures by role and kind",
                [(increase("errors_total", "role, kind"), "{{role}} {{kind}}")],
            ),
            ts(
                "Reward function failures",
                [(increase("reward_worker_errors_total", "worker, kind"), "{{worker}} {{kind}}")],
            ),
            ts(
                "Redis errors (buffer)",
                [(increase("buffer_redis_errors_total", "op"), "{{op}}")],
            ),
        ],
    ),
    (
        "Learner",
        [
            ts("Policy loss", [(f"max({m('learner_policy_loss')})", "loss")], w=6),
            ts("Gradient norm", [(f"max({m('learner_grad_norm')})", "grad norm")], w=6),
            ts(
                "Clip fraction",
                [(f"max({m('learner_clip_fraction')})", "clipped")],
                unit="percentunit",
                w=6,
            ),
            ts("KL to reference", [(f"max({m('learner_kl')})", "kl")], w=6),
            ts(
                "Tokens/s per rank",
                [(rate("learner_worker_tokens_total", "rank"), "rank {{rank}}")],
            ),
            ts(
                "Micro-batches per rank",
                [
                    (
                        rate("learner_worker_microbatches_total", "rank, kind"),
                        "rank {{rank}} {{kind}}",
                    )
                ],
                unit="ops",
            ),
            ts(
                "Mini-batch step time per rank (p90)",
                [(quantile(0.9, "learner_worker_step_seconds", "rank"), "rank {{rank}}")],
                unit="s",
            ),
            ts(
                "Positions run per trained token",
                [(f"max({m('learner_positions_per_token')})", "positions / token")],
                w=8,
            ),
            ts(
                "Peak memory per micro-batch (largest rank)",
                [(f"max({m('learner_peak_memory_bytes')})", "peak")],
                unit="bytes",
                w=8,
            ),
            ts(
                "Off-policy importance weights (decoupled loss)",
                [
                    (f"max({m('learner_behaviour_imp_weight')})", "mean weight"),
                    (f"max({m('learner_behaviour_truncated_fraction')})", "truncated share"),
                ],
                w=8,
            ),
        ],
    ),
    (
        "Rollout workers",
        [
            ts(
                "Prompts/s per worker",
                [(rate("rollout_worker_requests_total", "worker"), "{{worker}}")],
                unit="ops",
            ),
            ts(
                "Tokens/s per worker",
                [(rate("rollout_worker_tokens_total", "worker"), "{{worker}}")],
            ),
            ts(
                "Generate time per worker (p90)",
                [(quantile(0.9, "rollout_worker_generate_seconds", "worker"), "{{worker}}")],
                unit="s",
            ),
            ts(
                "Weight version per worker",
                [(f"max by (worker) ({m('rollout_worker_weight_version')})", "{{worker}}")],
            ),
            ts(
                "Weight load time per worker (p90)",
                [(quantile(0.9, "rollout_worker_weight_load_seconds", "worker"), "{{worker}}")],
                unit="s",
            ),
        ],
    ),
    (
        "Reward workers",
        [
            ts(
                "Responses scored/s per worker",
                [(rate("reward_worker_scored_total", "worker"), "{{worker}}")],
                unit="ops",
            ),
            ts(
                "Scoring time per worker (p90)",
                [(quantile(0.9, "reward_worker_seconds", "worker"), "{{worker}}")],
                unit="s",
            ),
        ],
    ),
]


def panel(spec: JSON, pid: int, x: int, y: int) -> JSON:
    """A Grafana panel from a spec of :func:`ts`, :func:`stat` or :func:`heatmap`."""
    targets = [
        {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
        | ({"format": "heatmap"} if spec["type"] == "heatmap" else {})
        for i, (expr, legend) in enumerate(spec["targets"])
    ]
    out: dict[str, Any] = {
        "id": pid,
        "type": spec["type"],
        "title": spec["title"],
        "datasource": DS,
        "gridPos": {"h": 8, "w": spec["w"], "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": spec["unit"]}, "overrides": []},
    }
    if spec["type"] == "timeseries":
        custom = {"stacking": {"mode": "normal" if spec.get("stack") else "none"}}
        out["fieldConfig"]["defaults"]["custom"] = custom
        out["options"] = {"legend": {"displayMode": "list", "placement": "bottom"}}
    if spec["type"] == "heatmap":
        out["options"] = {"calculate": False, "yAxis": {"unit": "short"}}
    return out


def dashboard() -> JSON:
    """The dashboard as Grafana's JSON model (schemaVersion 39)."""
    panels: list[JSON] = []
    y = 0
    for title, specs in ROWS:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        x = 0
        for spec in specs:
            if x + spec["w"] > 24:
                x, y = 0, y + 8
            panels.append(panel(spec, len(panels) + 1, x, y))
            x += spec["w"]
        y += 8
    namespace_query = "label_values(shuffle_r1_trainer_step, namespace)"
    return {
        "title": "shuffle-r1",
        "uid": "shuffle-r1",
        "description": "Shuffle-R1 training: step time, rollout, reward, PTS/ABS diagnostics, "
        "replay buffer, learner and per-worker metrics (shuffle_r1/metric_catalog.py)",
        "tags": ["shuffle-r1", "ray", "rl"],
        "editable": True,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "graphTooltip": 1,
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                },
                {
                    "name": "namespace",
                    "label": "Namespace",
                    "type": "query",
                    "datasource": DS,
                    "definition": namespace_query,
                    "query": {"query": namespace_query, "refId": "namespace"},
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {},
                    "refresh": 2,
                    "sort": 1,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
