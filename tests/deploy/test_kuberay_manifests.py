"""The plain manifests in ``deploy/kuberay/``: what the chart renders with
``deploy/kuberay/values.yaml`` (no drift), valid objects, and a trainer command whose keys
agree with the pods."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from k8s_offline import (
    ROOT,
    assert_trainer_matches_pods,
    iter_documents,
    ray_cluster_spec,
    trainer_config,
    validate_object,
)

KUBERAY = ROOT / "deploy" / "kuberay"
MANIFESTS = sorted(p for p in KUBERAY.glob("*.yaml") if p.name != "values.yaml")
SHARED = ("redis.yaml", "services.yaml", "recipe-configmap.yaml")


def load(*names: str) -> tuple[dict[str, Any], ...]:
    return tuple(d for n in names for d in iter_documents((KUBERAY / n).read_text()))


def test_manifests_are_what_the_chart_renders() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy" / "render_manifests.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_object_is_valid(path: Path) -> None:
    docs = list(iter_documents(path.read_text()))
    assert docs
    for doc in docs:
        validate_object(doc)


@pytest.mark.parametrize("kind_file", ["rayjob.yaml", "raycluster.yaml"])
def test_trainer_args_match_the_pods(kind_file: str, tmp_path: Path) -> None:
    """The RayJob's entrypoint is also what to run in the RayCluster's head pod: one
    cluster spec, the same recipe keys, consistent with either."""
    job = load("rayjob.yaml", *SHARED)
    objects = load(kind_file, *SHARED)
    cfg = trainer_config(job[0]["spec"]["entrypoint"], objects, tmp_path)
    assert_trainer_matches_pods(cfg, objects)
    assert ray_cluster_spec(objects) == ray_cluster_spec(job)


def test_secrets_are_the_ones_the_readme_creates() -> None:
    """The plain manifests hold no Secret; they name the ones the README has you create (the
    Redis password, the buffer's and the reward endpoint's tokens, Ray's token for KubeRay)."""
    objects = load(*(p.name for p in MANIFESTS))
    assert not [o for o in objects if o["kind"] == "Secret"]
    refs = set()

    def collect(node: Any) -> None:
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                refs.add((node["secretKeyRef"]["name"], node["secretKeyRef"]["key"]))
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)

    collect(list(objects))
    refs.add((ray_cluster_spec(load("rayjob.yaml"))["authOptions"]["secretName"], "auth_token"))
    assert refs == {
        ("shuffle-r1-redis", "redis-password"),
        ("shuffle-r1-buffer-token", "token"),
        ("shuffle-r1-reward-token", "token"),
        ("shuffle-r1-ray-token", "auth_token"),
    }
    readme = (ROOT / "README.md").read_text()
    for name, key in refs:
        command = rf"kubectl (-n \S+ )?create secret generic {name} --from-literal={key}="
        assert re.search(command, readme), f"the README does not create {name} ({key})"
