"""The Helm chart, rendered offline with each values file in ``helm/shuffle-r1/ci/``: every
object as the API server would judge it, and what no schema checks (worker bounds, secrets,
metrics relabelling, the trainer's recipe keys against the pods)."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python
import pytest
import yaml
from jsonschema import Draft4Validator
from k8s_offline import (
    CHART,
    InvalidObject,
    Render,
    assert_relabel_rule,
    assert_trainer_matches_pods,
    container,
    groups,
    ray_cluster_spec,
    render_chart,
    server_schema,
    trainer_config,
    validate_object,
)

SECRET_NAME = re.compile(r"(?i)(password|token|secret|credential|apikey|api_key)")


def walk(node: Any, path: str = "") -> Any:
    """(path, key, value) of every mapping entry under ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            yield f"{path}.{k}", k, v
            yield from walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


def train_command(r: Render) -> str:
    """The trainer's command: the RayJob's entrypoint, or (RayCluster) the one NOTES prints."""
    jobs = r.of_kind("RayJob")
    if jobs:
        return str(jobs[0]["spec"]["entrypoint"])
    match = re.search(r'bash -c (".*")$', r.notes, re.MULTILINE)
    assert match, f"NOTES.txt shows no train command:\n{r.notes}"
    return str(json.loads(match.group(1)))


def test_every_object_is_valid(rendered: Render) -> None:
    assert rendered.objects
    for obj in rendered.objects:
        validate_object(obj)
    kinds = {o["kind"] for o in rendered.objects}
    mode = rendered.values["mode"]
    assert ("RayJob" in kinds, "RayCluster" in kinds) == (mode == "rayjob", mode == "raycluster")


def test_validator_rejects_a_typo() -> None:
    """The validators can fail: a misspelt field in a CRD object, in a pod template inside it
    and in a core object are refused, as are a wrong type and a bad name."""
    r = render_chart((CHART / "ci" / "raycluster-values.yaml").read_text())
    cluster = copy.deepcopy(r.of_kind("RayCluster")[0])
    validate_object(cluster)

    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = typo["spec"]["workerGroupSpecs"][0].pop(
        "maxReplicas"
    )
    with pytest.raises(InvalidObject, match="maxReplica"):
        validate_object(typo)

    nested = copy.deepcopy(cluster)
    container(nested["spec"]["headGroupSpec"])["imagePullPolicyy"] = "Always"
    with pytest.raises(InvalidObject, match="imagePullPolicyy"):
        validate_object(nested)

    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["enableInTreeAutoscaling"] = "yes"
    with pytest.raises(InvalidObject, match="enableInTreeAutoscaling"):
        validate_object(wrong_type)

    meta = copy.deepcopy(cluster)
    meta["metadata"]["lables"] = {"a": "b"}
    with pytest.raises(InvalidObject, match="lables"):
        validate_object(meta)

    service = copy.deepcopy(next(o for o in r.objects if o["kind"] == "Service"))
    service["spec"]["selektor"] = service["spec"].pop("selector")
    with pytest.raises(InvalidObject, match="selektor"):
        validate_object(service)

    bad_name = copy.deepcopy(next(o for o in r.objects if o["kind"] == "Service"))
    bad_name["metadata"]["name"] = "Shuffle_R1"
    with pytest.raises(InvalidObject, match="not a valid name"):
        validate_object(bad_name)


def test_server_schema_reads_a_crd_as_the_api_server_does() -> None:
    """The three adjustments: unknown fields refused (also inside maps and lists, not where
    a CRD preserves unknown fields), defaulted fields optional, nullable fields nullable."""
    crd = {
        "type": "object",
        "required": ["a", "b"],
        "properties": {
            "a": {"type": "string"},
            "b": {"type": "integer", "default": 1},
            "c": {"type": "string", "nullable": True},
            "m": {"type": "object", "additionalProperties": {"properties": {"x": {}}}},
            "l": {"type": "array", "items": {"properties": {"x": {}}}},
            "p": {"x-kubernetes-preserve-unknown-fields": True, "properties": {"x": {}}},
        },
    }
    check = Draft4Validator(server_schema(crd)).is_valid
    assert check({"a": "s"}) and not check({"b": 1})
    assert check({"a": "s", "c": None})
    assert not check({"a": "s", "typo": 1})
    assert check({"a": "s", "m": {"k": {"x": 1}}}) and not check({"a": "s", "m": {"k": {"y": 1}}})
    assert check({"a": "s", "l": [{"x": 1}]}) and not check({"a": "s", "l": [{"y": 1}]})
    assert check({"a": "s", "p": {"anything": 1}})


def test_worker_groups_within_bounds(rendered: Render) -> None:
    spec = ray_cluster_spec(rendered.objects)
    assert spec["enableInTreeAutoscaling"] is True
    for group in spec["workerGroupSpecs"]:
        assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group
    rollout = groups(spec)["rollout"]
    values = rendered.values["rollout"]
    assert (rollout["minReplicas"], rollout["replicas"], rollout["maxReplicas"]) == (
        values["minReplicas"],
        values["replicas"],
        values["maxReplicas"],
    )


def test_service_monitor_only_when_enabled(rendered: Render) -> None:
    monitors = rendered.of_kind("ServiceMonitor")
    assert len(monitors) == int(rendered.values["metrics"]["serviceMonitor"]["enabled"])
    for monitor in monitors:
        want = rendered.values["metrics"]["serviceMonitor"]["labels"]
        assert want.items() <= monitor["metadata"]["labels"].items()


def test_service_monitor_scrapes_every_exporter(rendered: Render) -> None:
    """Each endpoint's port is a named port of a Service the monitor selects, which selects
    the pods that open it; and every endpoint carries the ray_ prefix relabel rule."""
    for monitor in rendered.of_kind("ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [
            s
            for s in rendered.of_kind("Service")
            if selector.items() <= s["metadata"]["labels"].items()
        ]
        spec = ray_cluster_spec(rendered.objects)
        for endpoint in monitor["spec"]["endpoints"]:
            assert_relabel_rule(endpoint["metricRelabelings"], camel=True)
            svc = [s for s in services if endpoint["port"] in port_names(s)]
            assert svc, f"no selected Service has a port {endpoint['port']!r}"
            target = next(
                p["targetPort"] for p in svc[0]["spec"]["ports"] if p["name"] == endpoint["port"]
            )
            pods = [
                g
                for g in groups(spec).values()
                if svc[0]["spec"]["selector"].items() <= g["template"]["metadata"]["labels"].items()
            ]
            assert pods and all(
                target in {p["name"] for p in container(g)["ports"]} for g in pods
            ), f"the pods behind {svc[0]['metadata']['name']} do not all open {target!r}"
        exporters = {"metrics", "trainer-metrics", "buffer-metrics"}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} == exporters


def port_names(service: dict[str, Any]) -> set[str]:
    return {p["name"] for p in service["spec"]["ports"]}


def test_no_secret_value_in_manifests(rendered: Render) -> None:
    """Secret-looking env vars come from Secrets; the values of the Secrets the chart makes
    appear nowhere else; the head (trainer, buffer) gets the password and the token."""
    secrets = rendered.of_kind("Secret")
    secret_values = {
        base64.b64decode(v).decode() for s in secrets for v in s.get("data", {}).values()
    }
    assert all(len(v) >= 32 for v in secret_values), "generated secrets are 32 characters"
    others = [o for o in rendered.objects if o["kind"] != "Secret"]
    text = yaml.safe_dump_all(others)
    for value in secret_values:
        assert value not in text
    names = {s["metadata"]["name"] for s in secrets}
    existing = {
        rendered.values["redis"]["auth"]["existingSecret"],
        rendered.values["buffer"]["auth"]["existingSecret"],
        rendered.values["reward"]["auth"]["existingSecret"],
    }
    for obj in others:
        for path, key, value in walk(obj):
            if key == "env":
                for var in value:
                    if SECRET_NAME.search(var["name"]):
                        ref = var.get("valueFrom", {}).get("secretKeyRef")
                        assert ref, f"{path}: {var['name']} must come from a secretKeyRef"
                        assert ref["name"] in names | existing, f"{path}: unknown Secret {ref}"
    head = container(groups(ray_cluster_spec(rendered.objects))["head"])
    env = {v["name"]: v for v in head["env"]}
    assert "secretKeyRef" in env["SHUFFLE_R1_BUFFER_TOKEN"]["valueFrom"]
    redis_has_password = rendered.values["redis"]["internal"] or bool(
        rendered.values["redis"]["auth"]["existingSecret"]
    )
    assert ("SHUFFLE_R1_REDIS_PASSWORD" in env) == redis_has_password
    for var in env.values():
        assert "value" not in var or not SECRET_NAME.search(var["name"])


@pytest.mark.parametrize(
    "path",
    [
        CHART / "values.yaml",
        *sorted((CHART / "ci").glob("*.yaml")),
        CHART.parents[1] / "deploy" / "kuberay" / "values.yaml",
    ],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_values_files_hold_no_secret(path: Path) -> None:
    """A secret-looking key in a values file names a Secret or a key in it, never a value."""
    for where, key, value in walk(yaml.safe_load(path.read_text()) or {}):
        if SECRET_NAME.search(str(key)) and not isinstance(value, dict):
            assert key in (
                "existingSecret",
                "secretKey",
                "pullSecrets",
                "secretName",
                "clientSecretName",
            ), f"{path.name}{where}"
        if key == "externalUrl" and value:
            url = urlsplit(value)
            assert url.password is None and url.username is None, f"{path.name}{where}"


def test_trainer_args_match_the_pods(rendered: Render, tmp_path: Path) -> None:
    """The trainer's command loads through the real CLI and config (every key exists, every
    value is allowed), and the keys that describe the cluster agree with the pods."""
    cfg = trainer_config(train_command(rendered), rendered.objects, tmp_path)
    assert_trainer_matches_pods(cfg, rendered.objects)
    for key, value in rendered.values["recipe"]["overrides"].items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value, f"override {key} was lost"


def test_lint_is_clean(values_file: Path) -> None:
    values = helm_python.values_from_yaml(values_file.read_text())
    report = helm_python.lint(CHART, values, strict=True, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


IMPOSSIBLE = {
    "min above max": (
        "rollout: {minReplicas: 4, replicas: 4, maxReplicas: 2}",
        "minReplicas <= replicas <= maxReplicas; got 4 <= 4 <= 2",
    ),
    "replicas above max": (
        "rollout: {minReplicas: 1, replicas: 5, maxReplicas: 4}",
        "got 1 <= 5 <= 4",
    ),
    "two recipes": (
        "recipe: {file: configs/tiny_cpu.yaml}",
        "set exactly one of recipe.file",
    ),
    "no recipe": ("recipe: {inline: ''}", "set exactly one of recipe.file"),
    "override of a chart key": (
        "recipe: {overrides: {rollout.num_workers: 3}}",
        "recipe.overrides.rollout.num_workers: the chart sets",
    ),
    "secret in overrides": (
        "recipe: {overrides: {buffer.auth_token: hunter2}}",
        "secrets do not go in values",
    ),
    "reward token in overrides": (
        "recipe: {overrides: {reward.http_token: hunter2}}",
        "secrets do not go in values",
    ),
    "Ray without token auth": ("ray: {authMode: disabled}", "token auth only"),
    "buffer TLS without a Secret": (
        "buffer: {tls: {enabled: true}}",
        "buffer.tls.enabled=true needs buffer.tls.secretName",
    ),
    "buffer TLS Secret while TLS is off": (
        "buffer: {tls: {secretName: buffer-tls}}",
        "set buffer.tls.enabled=true",
    ),
    "reward endpoint beyond the cluster": (
        "reward: {service: {type: LoadBalancer}}",
        "/reward/service/type",
    ),
    "a network peer that is empty (everyone)": (
        "networkPolicy: {rewardClients: [{}]}",
        "/networkPolicy/rewardClients/0",
    ),
    "override not section.key": (
        "recipe: {overrides: {total_steps: 3}}",
        "must look like section.key",
    ),
    "password in the Redis URL": (
        "redis: {internal: false, externalUrl: 'redis://:pw@redis:6379/0'}",
        "without a password",
    ),
    "external URL with internal Redis": (
        "redis: {externalUrl: 'redis://redis:6379/0'}",
        "set redis.internal=false",
    ),
    "model folder without a volume": (
        "model: {volume: {existingClaim: ''}}",
        "must be on the model volume",
    ),
    "unknown model name": ("model: {path: qwen}", "neither a folder on the model volume"),
    "not a Hugging Face id": ("model: {path: 'Qwen/Qwen 2.5'}", "a Hugging Face id"),
    "shared port": ("metrics: {trainerPort: 8080}", "share a port"),
    "typo in a key": ("rollout: {maxReplica: 3}", "additional properties 'maxReplica'"),
    "wrong type": ("rollout: {replicas: two}", "/rollout/replicas"),
    "unknown mode": ("mode: rayservice", "/mode"),
    "zero learner ranks": ("learner: {ranksPerPod: 0}", "/learner/ranksPerPod"),
}


@pytest.mark.parametrize("values,message", IMPOSSIBLE.values(), ids=IMPOSSIBLE.keys())
def test_impossible_values_fail_clearly(values: str, message: str) -> None:
    with pytest.raises((helm_python.HelmRenderError, helm_python.HelmValuesError)) as info:
        render_chart(values)
    assert message in str(info.value)


def test_large_integer_override_stays_an_integer(tmp_path: Path) -> None:
    """Helm holds numbers as float64 (1000000 prints as 1e+06): overrides come out as ints."""
    r = render_chart("recipe: {overrides: {trainer.total_steps: 1000000, learner.lr: 2.0e-6}}")
    command = train_command(r)
    assert "'trainer.total_steps=1000000'" in command
    cfg = trainer_config(command, r.objects, tmp_path)
    assert (cfg.trainer.total_steps, cfg.learner.lr) == (1000000, 2.0e-6)


def test_a_hugging_face_id_is_a_model(tmp_path: Path) -> None:
    """An id needs no model volume; the trainer gets it as learner.model_path (#19 item 1)."""
    r = render_chart("model: {path: Qwen/Qwen2.5-0.5B-Instruct@main, volume: {existingClaim: ''}}")
    cfg = trainer_config(train_command(r), r.objects, tmp_path)
    assert cfg.learner.model_path == "Qwen/Qwen2.5-0.5B-Instruct@main"


def test_notes_tell_how_to_train_and_scale() -> None:
    r = render_chart((CHART / "ci" / "raycluster-values.yaml").read_text())
    assert "shuffle-r1 scale rollout" in r.notes and "bash -c" in r.notes
    job = render_chart("")
    assert "get rayjob shuffle-r1" in job.notes


def labels_of(objects: tuple[dict[str, Any], ...]) -> dict[str, dict[str, str]]:
    """Pod labels by component: each Ray group's and Redis's pod template."""
    out = {
        name: g["template"]["metadata"]["labels"]
        for name, g in groups(ray_cluster_spec(objects)).items()
    }
    for sts in (o for o in objects if o["kind"] == "StatefulSet"):
        out["redis"] = sts["spec"]["template"]["metadata"]["labels"]
    return out


def selected(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels selectors here: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def allowed(policies: list[dict[str, Any]], pod: dict[str, str]) -> list[dict[str, Any]]:
    """The ingress rules that apply to a pod with labels ``pod``."""
    return [
        rule
        for p in policies
        if selected(p["spec"]["podSelector"], pod)
        for rule in p["spec"].get("ingress", [])
    ]


def test_network_policies_let_only_the_release_reach_ray_the_buffer_and_redis(
    rendered: Render,
) -> None:
    """Every Ray pod and Redis is selected by an Ingress policy (so all else is denied); a
    rule without ports admits only the release's Ray pods; Redis admits only the head; the
    metrics ports admit the configured Prometheus; no rule admits everyone."""
    policies = rendered.of_kind("NetworkPolicy")
    values = rendered.values
    assert policies, "networkPolicy.enabled is true by default"
    pods = labels_of(rendered.objects)
    ray_pods = {k: v for k, v in pods.items() if k != "redis"}
    assert set(ray_pods) == {"head", "rollout", "learner"}
    for p in policies:
        assert p["spec"]["policyTypes"] == ["Ingress"]
        for rule in p["spec"]["ingress"]:
            assert rule.get("from"), f"{p['metadata']['name']}: a rule without from admits all"
            for peer in rule["from"]:
                assert peer and all(v for v in peer.values()), f"an empty peer admits all: {peer}"
    for name, labels in pods.items():
        assert allowed(policies, labels), f"no policy selects the {name} pods: all may reach them"
        for rule in allowed(policies, labels):
            if "ports" not in rule:  # every port: only from the release's Ray pods
                for peer in rule["from"]:
                    assert set(peer) == {"podSelector"}, peer
                    admitted = [n for n, lb in pods.items() if selected(peer["podSelector"], lb)]
                    assert admitted and set(admitted) <= set(ray_pods), (name, admitted)

    def ports_from(labels: dict[str, str], peers: list[dict[str, Any]]) -> set[int]:
        return {
            port["port"]
            for rule in allowed(policies, labels)
            if all(peer in rule["from"] for peer in peers)
            for port in rule.get("ports", [])
        }

    prometheus = values["networkPolicy"]["prometheus"]
    metrics = values["metrics"]
    assert ports_from(pods["head"], prometheus) == {
        values["ray"]["metricsExportPort"],
        metrics["trainerPort"],
        metrics["bufferPort"],
    }
    for name in ("rollout", "learner"):
        assert ports_from(pods[name], prometheus) == {values["ray"]["metricsExportPort"]}
    assert ports_from(pods["head"], values["networkPolicy"]["operator"]) == {8265}
    reward_port = values["reward"]["httpPort"]
    rewarders = values["networkPolicy"]["rewardClients"]
    assert (reward_port in ports_from(pods["head"], rewarders)) == bool(rewarders)
    if "redis" in pods:
        [rule] = allowed(policies, pods["redis"])
        assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
        admitted = {n for n, lb in pods.items() if selected(rule["from"][0]["podSelector"], lb)}
        assert admitted == {"head"}, "only the head (the buffer) talks to Redis"


def test_network_policies_can_be_turned_off_and_admit_reward_clients() -> None:
    assert not render_chart("networkPolicy: {enabled: false}").of_kind("NetworkPolicy")
    r = render_chart(
        "networkPolicy: {rewardClients: [{podSelector: {matchLabels: {app: verifier}}}]}"
    )
    head = labels_of(r.objects)["head"]
    rules = [
        rule
        for rule in allowed(r.of_kind("NetworkPolicy"), head)
        if {"podSelector": {"matchLabels": {"app": "verifier"}}} in rule["from"]
    ]
    assert [rule["ports"] for rule in rules] == [[{"protocol": "TCP", "port": 8000}]]


def test_ray_token_auth_and_the_reward_token_come_from_secrets(rendered: Render) -> None:
    """KubeRay runs Ray with token auth from a Secret holding auth_token; the head gets the
    reward endpoint's token from a Secret; the endpoint's Service stays in the cluster."""
    spec = ray_cluster_spec(rendered.objects)
    values = rendered.values
    name = spec["authOptions"]["secretName"]
    assert spec["authOptions"]["mode"] == "token"
    made = {s["metadata"]["name"]: s for s in rendered.of_kind("Secret")}
    if values["ray"]["auth"]["existingSecret"]:
        assert name == values["ray"]["auth"]["existingSecret"] and name not in made
    else:
        assert "auth_token" in made[name]["data"]  # the key KubeRay reads
    env = {v["name"]: v for v in container(groups(spec)["head"])["env"]}
    ref = env["SHUFFLE_R1_REWARD_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] == values["reward"]["auth"]["secretKey"]
    assert ref["name"] in made or ref["name"] == values["reward"]["auth"]["existingSecret"]
    for service in rendered.of_kind("Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]


def test_buffer_tls_mounts_the_certificates_and_sets_the_recipe_keys(tmp_path: Path) -> None:
    """With buffer.tls the head mounts the Secrets read-only and the trainer's buffer.tls_*
    keys point into them (mutual TLS with clientSecretName); without it, neither."""
    plain = render_chart("")
    cfg = trainer_config(train_command(plain), plain.objects, tmp_path)
    assert not (cfg.buffer.tls_cert or cfg.buffer.tls_client_ca)
    for clients in ("", "buffer-client-tls"):
        r = render_chart(
            f"buffer: {{tls: {{enabled: true, secretName: buffer-tls, "
            f"clientSecretName: '{clients}'}}}}"
        )
        for obj in r.objects:
            validate_object(obj)
        pod = groups(ray_cluster_spec(r.objects))["head"]["template"]["spec"]
        secrets = {v["secret"]["secretName"]: v["name"] for v in pod["volumes"] if "secret" in v}
        mounts = {m["name"]: m for m in container({"template": {"spec": pod}})["volumeMounts"]}
        cfg = trainer_config(train_command(r), r.objects, tmp_path)
        assert_trainer_matches_pods(cfg, r.objects)  # every tls_* path is mounted on the head
        b = cfg.buffer
        server_dir = mounts[secrets["buffer-tls"]]["mountPath"]
        assert mounts[secrets["buffer-tls"]]["readOnly"] is True
        assert (b.tls_cert, b.tls_key, b.tls_ca_cert) == tuple(
            f"{server_dir}/{f}" for f in ("tls.crt", "tls.key", "ca.crt")
        )
        if clients:
            client_dir = mounts[secrets[clients]]["mountPath"]
            assert (b.tls_client_ca, b.tls_client_cert, b.tls_client_key) == tuple(
                f"{client_dir}/{f}" for f in ("ca.crt", "tls.crt", "tls.key")
            )
        else:
            assert not (b.tls_client_ca or b.tls_client_cert) and len(secrets) == 1
        for group in ("rollout", "learner"):  # only the head holds the keys
            spec = groups(ray_cluster_spec(r.objects))[group]["template"]["spec"]
            assert not [v for v in spec["volumes"] if "secret" in v], group
