"""The Grafana dashboard against the metric catalog: every query parses as PromQL, every
metric it selects is in ``shuffle_r1.metric_catalog`` with the labels it uses, and every
catalog metric is on some panel."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import promql_parser
import pytest

from shuffle_r1.metric_catalog import CATALOG, MetricSpec, spec_of_series

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "shuffle-r1.json"
GENERATOR = ROOT / "deploy" / "grafana" / "dashboard.py"
# Labels the scrape adds to every series (Prometheus, the Operator, deploy/prometheus/).
TARGET_LABELS = {"namespace", "pod", "instance", "job", "endpoint", "service", "container"}
# Grafana's built-in interval variables, as Grafana substitutes them before querying.
GRAFANA_INTERVALS = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__\w+)\}")


def load() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels() -> list[dict[str, Any]]:
    return [p for p in load()["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and of every query variable."""
    out = [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]
    for var in load()["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
            assert match, f"variable {var['name']}: unexpected query {var['query']}"
            out.append((f"${var['name']}", match.group(1)))
    return out


def allowed_labels(series: str, spec: MetricSpec) -> set[str]:
    return set(spec.labels) | TARGET_LABELS | ({"le"} if series.endswith("_bucket") else set())


def selectors(expr: Any) -> list[Any]:
    found: list[Any] = []
    promql_parser.walk(
        expr, lambda n: found.append(n) if isinstance(n, promql_parser.VectorSelector) else None
    )
    return found


def check_query(title: str, query: str) -> set[str]:
    """The catalog names ``query`` uses; fails for an unknown metric or label."""
    expr = promql_parser.parse(GRAFANA_INTERVALS.sub("5m", query))
    used: set[str] = set()
    for sel in selectors(expr):
        assert sel.name, f"{title}: select metrics by name, not by __name__ ({query})"
        spec = spec_of_series(sel.name)
        assert spec is not None, f"{title}: {sel.name} is not in the metric catalog"
        assert sel.name in spec.series, f"{title}: {sel.name} is not a series of {spec.name}"
        labels = {m.name for m in sel.matchers.matchers}
        labels |= {m.name for group in sel.matchers.or_matchers for m in group}
        unknown = labels - allowed_labels(sel.name, spec)
        assert not unknown, f"{title}: {sel.name} has no label {sorted(unknown)}"
        used.add(spec.name)

    def grouping(node: Any) -> None:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            have: set[str] = set()
            for s in selectors(node.expr):
                spec = spec_of_series(s.name)
                assert spec is not None, f"{title}: {s.name} is not in the metric catalog"
                have |= allowed_labels(s.name, spec)
            unknown = set(node.modifier.labels) - have
            assert not unknown, f"{title}: grouping by {sorted(unknown)}, which {query} lacks"

    promql_parser.walk(expr, grouping)
    return used


def test_every_query_uses_catalog_metrics_and_labels() -> None:
    qs = queries()
    assert len(qs) > 40
    for title, query in qs:
        check_query(title, query)


def test_every_catalog_metric_is_on_a_panel() -> None:
    used = set().union(*(check_query(title, q) for title, q in queries()))
    missing = sorted(m.name for m in CATALOG if m.name not in used)
    assert not missing, f"no panel shows {missing}"


@pytest.mark.parametrize(
    "query,error",
    [
        ("sum(rate(shuffle_r1_rollout_tokens_totl[5m]))", "not in the metric catalog"),
        ("shuffle_r1_step_seconds_total", "not in the metric catalog"),
        ("sum by (phase) (shuffle_r1_step_seconds_count)", "grouping by ['phase']"),
        ('shuffle_r1_reward_mean{spilt="val"}', "has no label ['spilt']"),
        ('{__name__="shuffle_r1_trainer_step"}', "not by __name__"),
        ("shuffle_r1_trainer_step_bucket", "not in the metric catalog"),
    ],
)
def test_check_query_rejects(query: str, error: str) -> None:
    """The check can fail: misspelt metrics, suffixes a gauge lacks, unknown labels."""
    with pytest.raises(AssertionError, match=re.escape(error)):
        check_query("probe", query)


def test_datasource_is_a_template_variable() -> None:
    variables = {v["name"]: v for v in load()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ref = {"type": "prometheus", "uid": "${datasource}"}
    for p in panels():
        assert p["datasource"] == ref, p["title"]
        assert all(t["datasource"] == ref for t in p["targets"]), p["title"]


def test_layout_is_a_grid() -> None:
    """Unique ids; panels inside 24 columns and not overlapping."""
    all_panels = load()["panels"]
    assert len({p["id"] for p in all_panels}) == len(all_panels)
    cells: set[tuple[int, int]] = set()
    for p in all_panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]
        mine = {
            (x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])
        }
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine


def test_json_is_what_the_generator_writes() -> None:
    done = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
