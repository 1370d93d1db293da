"""The Prometheus scrape configs in ``deploy/prometheus/``: each one renames Ray's
``ray_shuffle_r1_*`` back to the catalog's names, and its target rules select the ports and
pods the chart renders."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from k8s_offline import (
    ROOT,
    assert_relabel_rule,
    container,
    groups,
    iter_documents,
    ray_cluster_spec,
    render_chart,
    validate_object,
)

from shuffle_r1.metric_catalog import CATALOG, RAY_ROLES

SCRAPE_CONFIGS = ROOT / "deploy" / "prometheus" / "scrape-configs.yaml"
SERVICE_MONITOR = ROOT / "deploy" / "prometheus" / "servicemonitor.yaml"


def scrape_configs() -> list[dict[str, Any]]:
    configs = yaml.safe_load(SCRAPE_CONFIGS.read_text())["scrape_configs"]
    assert configs, f"{SCRAPE_CONFIGS} has no scrape config"
    return list(configs)


def relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus' replace/keep/drop relabelling of ``labels`` (None: the target or sample is
    dropped). Regexes are anchored; ``$1`` in a replacement is the first group."""
    out = dict(labels)
    for rule in rules:
        value = rule.get("separator", ";").join(out.get(s, "") for s in rule["source_labels"])
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        action = rule.get("action", "replace")
        if action == "keep" and not match:
            return None
        if action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$(\d+)", r"\\\1", rule.get("replacement", "$1"))
            out[rule["target_label"]] = match.expand(replacement)
    return out


@pytest.mark.parametrize("config", scrape_configs(), ids=lambda c: c["job_name"])
def test_every_scrape_config_strips_the_ray_prefix(config: dict[str, Any]) -> None:
    rules = config["metric_relabel_configs"]
    assert_relabel_rule(rules, camel=False)
    for spec in CATALOG:
        for series in spec.series:
            scraped = f"ray_{series}" if spec.role in RAY_ROLES else series
            assert relabel(rules, {"__name__": scraped}) == {"__name__": series}
    for other in ("ray_node_cpu_utilization", "ray_serve_num_http_requests_total"):
        assert relabel(rules, {"__name__": other}) == {"__name__": other}, "Ray's own metrics"


@pytest.mark.parametrize("config", scrape_configs(), ids=lambda c: c["job_name"])
def test_scrape_targets_are_the_charts_exporters(config: dict[str, Any]) -> None:
    """Applied to the pods the chart renders (as Kubernetes service discovery would present
    each declared container port), the target rules keep exactly the three exporters."""
    objects = render_chart("").objects
    kept = set()
    for name, group in groups(ray_cluster_spec(objects)).items():
        pod_labels = group["template"]["metadata"]["labels"]
        for port in container(group)["ports"]:
            meta = {
                "__meta_kubernetes_pod_container_port_name": port["name"],
                "__meta_kubernetes_pod_phase": "Running",
                "__meta_kubernetes_namespace": "rl",
                "__meta_kubernetes_pod_name": f"{name}-0",
            }
            for key, value in pod_labels.items():
                meta["__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)] = value
            target = relabel(config["relabel_configs"], meta)
            if target is not None:
                kept.add((name, port["name"]))
                assert target["namespace"] == "rl" and target["pod"] == f"{name}-0"
    assert kept == {
        ("head", "metrics"),
        ("head", "trainer-metrics"),
        ("head", "buffer-metrics"),
        ("rollout", "metrics"),
        ("learner", "metrics"),
    }


def test_service_monitor_manifest_is_valid() -> None:
    docs = list(iter_documents(SERVICE_MONITOR.read_text()))
    assert [d["kind"] for d in docs] == ["ServiceMonitor"]
    validate_object(docs[0])
    for endpoint in docs[0]["spec"]["endpoints"]:
        assert_relabel_rule(endpoint["metricRelabelings"], camel=True)
