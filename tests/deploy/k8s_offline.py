"""Render the Helm chart and judge Kubernetes objects offline, as an API server would.

- Core kinds: ``kubernetes-validate`` in strict mode (unknown fields are errors) against
  Kubernetes :data:`KUBE_VERSION`.
- Custom resources (RayJob, RayCluster, RayService, ServiceMonitor): jsonschema's
  Draft4Validator against the ``openAPIV3Schema`` of the CRDs in ``schemas/`` (KubeRay v1.7.0,
  prometheus-operator v0.93.0; SOURCES.txt), adjusted by :func:`server_schema` the way an API
  server reads it. Their ``metadata`` (a bare ``object`` in a CRD) is checked as ObjectMeta.
- Names: DNS-1123 subdomains; Services DNS-1035 labels (what the API server enforces and no
  schema says).

CEL rules (``x-kubernetes-validations``) are not evaluated: no Python library runs them.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python
import kubernetes_validate
import yaml
from jsonschema import Draft4Validator

from services.cli import build_parser
from shuffle_r1.config import Config, load_config
from shuffle_r1.metric_catalog import RAY_PREFIX_RELABEL

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "shuffle-r1"
SCHEMAS = Path(__file__).resolve().parent / "schemas"
KUBE_VERSION = "1.30"
RELEASE = "shuffle-r1"
NAMESPACE = "rl"

_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


class InvalidObject(ValueError):
    """An object the API server would refuse; the message names it and the failing field."""


def server_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's ``openAPIV3Schema`` as the API server applies it, for a Draft 4 validator.

    Three adjustments, at every level: objects that declare ``properties`` get
    ``additionalProperties: false`` (the server prunes or, with strict field validation,
    rejects unknown fields; a plain validator would let a typo pass); fields with a
    ``default`` leave ``required`` (the server fills them in); ``nullable: true`` adds the
    ``null`` type. Objects marked ``x-kubernetes-preserve-unknown-fields`` keep what they have.
    """
    out = dict(schema)
    if "properties" in out:
        props = {name: server_schema(sub) for name, sub in out["properties"].items()}
        out["properties"] = props
        if "additionalProperties" not in out and not out.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
        required = [n for n in out.get("required", []) if "default" not in props.get(n, {})]
        out.pop("required", None)
        if required:
            out["required"] = required
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = server_schema(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = server_schema(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [server_schema(sub) for sub in out[key]]
    if out.get("nullable") is True and "type" in out:
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
    return out


def drop_nulls(doc: Any) -> Any:
    """``doc`` without null values (the server drops them before validating)."""
    if isinstance(doc, dict):
        return {k: drop_nulls(v) for k, v in doc.items() if v is not None}
    if isinstance(doc, list):
        return [drop_nulls(v) for v in doc if v is not None]
    return doc


@functools.cache
def crd_validators() -> dict[tuple[str, str], Draft4Validator]:
    """(apiVersion, kind) -> validator, for every served version of every CRD in ``schemas/``."""
    validators = {}
    for path in sorted(SCHEMAS.glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=yaml.CSafeLoader)  # libyaml: 3 MB
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schema = server_schema(version["schema"]["openAPIV3Schema"])
                validators[(f"{group}/{version['name']}", kind)] = Draft4Validator(schema)
    return validators


def object_name(doc: dict[str, Any]) -> str:
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def validate_object(doc: dict[str, Any]) -> None:
    """Raise :class:`InvalidObject` if the API server would refuse ``doc``."""
    name = object_name(doc)
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    validator = crd_validators().get(key)
    if validator is not None:
        errors = sorted(validator.iter_errors(drop_nulls(doc)), key=lambda e: list(e.path))
        if errors:
            lines = [f"  at {'/'.join(map(str, e.path)) or '/'}: {e.message}" for e in errors]
            raise InvalidObject(f"{name} fails the {key[1]} CRD schema:\n" + "\n".join(lines))
        # A CRD's metadata is a bare object: judge it as the ObjectMeta it is, by wrapping it
        # in the simplest core kind.
        doc_meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata")}
        _validate_core(doc_meta, name)
    else:
        _validate_core(doc, name)
    _validate_names(doc, name)


def _validate_core(doc: dict[str, Any], name: str) -> None:
    try:
        kubernetes_validate.validate(copy.deepcopy(doc), KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(map(str, exc.path)) or "/"
        raise InvalidObject(f"{name} at {path}: {exc.message}") from exc
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise InvalidObject(
            f"{name}: no schema for {doc.get('apiVersion')} {doc.get('kind')}"
        ) from exc


def _validate_names(doc: dict[str, Any], name: str) -> None:
    meta_name = (doc.get("metadata") or {}).get("name", "")
    pattern = _DNS1035 if doc.get("kind") == "Service" else _SUBDOMAIN
    if not (pattern.match(meta_name) and len(meta_name) <= 63):
        raise InvalidObject(f"{name}: metadata.name {meta_name!r} is not a valid name")


def iter_documents(text: str) -> Iterator[dict[str, Any]]:
    """The non-empty YAML documents of a manifest file."""
    for doc in yaml.safe_load_all(text):
        if doc:
            yield doc


@dataclass(frozen=True)
class Render:
    """One rendering of the chart: the merged values, the objects in template order, NOTES."""

    values: dict[str, Any]
    objects: tuple[dict[str, Any], ...]
    notes: str

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]


@functools.cache
def render_chart(values_yaml: str = "") -> Render:
    """Render the chart with ``values_yaml`` (the text of a values file), as ``helm install``
    would. Raises ``helm_python.HelmError`` subclasses as Helm would (a value the schema
    refuses, a ``fail`` in a template). Cached: callers must not modify what it returns."""
    values = helm_python.values_from_yaml(values_yaml) if values_yaml.strip() else {}
    with helm_python.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
        merged = chart.merge_values(values)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path in sorted(files):
        if path.endswith("NOTES.txt"):
            notes = files[path]
        else:
            objects.extend(iter_documents(files[path]))
    return Render(merged, tuple(objects), notes)


def ray_cluster_spec(objects: tuple[dict[str, Any], ...] | list[dict[str, Any]]) -> dict[str, Any]:
    """The one RayCluster spec among ``objects``: a RayJob's ``rayClusterSpec`` or a
    RayCluster's ``spec``."""
    specs = [o["spec"]["rayClusterSpec"] for o in objects if o["kind"] == "RayJob"]
    specs += [o["spec"] for o in objects if o["kind"] == "RayCluster"]
    assert len(specs) == 1, f"expected one RayJob or RayCluster, found {len(specs)}"
    return specs[0]


def ray_custom_resources(ray_start_params: dict[str, str]) -> dict[str, float]:
    """The custom Ray resources a group advertises: KubeRay's ``resources`` rayStartParam is a
    JSON object inside double quotes with escaped inner quotes (``"{\\"rollout\\": 1}"``)."""
    raw = ray_start_params.get("resources")
    if raw is None:
        return {}
    assert raw.startswith('"') and raw.endswith('"'), f"resources {raw!r} must be double-quoted"
    parsed = json.loads(raw[1:-1].replace('\\"', '"'))
    assert isinstance(parsed, dict), f"resources {raw!r} is not a JSON object"
    return {str(k): float(v) for k, v in parsed.items()}


def groups(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``head`` and every worker group of a RayCluster spec, by name."""
    out = {"head": spec["headGroupSpec"]}
    out.update({g["groupName"]: g for g in spec.get("workerGroupSpecs", [])})
    return out


def container(group: dict[str, Any]) -> dict[str, Any]:
    """A group's Ray container (the first one: KubeRay runs Ray in it)."""
    return group["template"]["spec"]["containers"][0]


def _secret_ref(env: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    for var in env:
        if var["name"] == name:
            ref = (var.get("valueFrom") or {}).get("secretKeyRef")
            assert ref, f"env {name} must come from a Secret (valueFrom.secretKeyRef)"
            return dict(ref)
    return None


def _mounted(path: str, c: dict[str, Any]) -> bool:
    mounts = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", [])]
    return any(path.startswith(m) for m in mounts)


def trainer_config(command: str, objects: tuple[dict[str, Any], ...], workdir: Path) -> Config:
    """The config the trainer would run with: ``command`` (a RayJob entrypoint) parsed by the
    real ``shuffle-r1`` CLI and loaded with :func:`shuffle_r1.config.load_config`, the recipe
    read from the image (``/app/...`` is this repository) or from the rendered ConfigMap
    mounted on the head (written to ``workdir``), with the environment variables the head
    takes from Secrets set (to placeholders) while it loads. Raises ``ConfigError`` for a bad
    key."""
    argv = shlex.split(command)
    assert argv[:5] == ["cd", "/app", "&&", "exec", "shuffle-r1"], f"unexpected {argv[:5]}"
    args = build_parser().parse_args(argv[5:])
    assert args.command == "train", f"the entrypoint runs {args.command!r}, not train"
    recipe = Path(args.config)
    if recipe.parts[:2] == ("/", "app"):
        recipe = ROOT.joinpath(*recipe.parts[2:])
    else:
        head = container(groups(ray_cluster_spec(objects))["head"])
        pod = groups(ray_cluster_spec(objects))["head"]["template"]["spec"]
        mount = next(m for m in head["volumeMounts"] if recipe.is_relative_to(m["mountPath"]))
        volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
        cm_name = volume["configMap"]["name"]
        cm = next(
            o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == cm_name
        )
        text = cm["data"][str(recipe.relative_to(mount["mountPath"]))]
        recipe = workdir / recipe.name
        recipe.write_text(text)
    # the head's environment: each variable the pod takes from a Secret holds a value there
    head_env = container(groups(ray_cluster_spec(objects))["head"]).get("env", [])
    from_secrets = {
        var["name"]: f"<{ref['name']}/{ref['key']}>"
        for var in head_env
        if (ref := (var.get("valueFrom") or {}).get("secretKeyRef"))
    }
    saved = {name: os.environ.get(name) for name in from_secrets}
    os.environ.update(from_secrets)
    try:
        return load_config(recipe, args.overrides)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def assert_trainer_matches_pods(cfg: Config, objects: tuple[dict[str, Any], ...]) -> None:
    """The recipe keys that must agree with the rendered pods do: Ray resources and GPUs per
    worker group, worker bounds, ports, the Redis address, volumes, secrets."""
    spec = ray_cluster_spec(objects)
    g = groups(spec)
    assert cfg.cluster.ray_address == "auto"
    assert cfg.cluster.auth_mode == spec.get("authOptions", {}).get("mode", "disabled")

    def per_pod(group: str, resource: str, wanted: dict[str, float]) -> int:
        advertised = ray_custom_resources(g[group]["rayStartParams"])
        assert wanted == {resource: wanted.get(resource, 0.0)} and wanted[resource] > 0, (
            f"{group} actors must ask for the {resource!r} Ray resource only, not {wanted}"
        )
        for other, og in g.items():
            if other != group:
                assert resource not in ray_custom_resources(og["rayStartParams"]), (
                    f"group {other!r} advertises {resource!r}: {group} actors could land there"
                )
        count = advertised.get(resource, 0.0) / wanted[resource]
        assert count >= 1 and count == int(count), f"{group} pods fit {count} actors"
        return int(count)

    def gpus(group: str) -> int:
        limits = container(g[group]).get("resources", {}).get("limits", {})
        return int(limits.get("nvidia.com/gpu", 0))

    ro, rg = cfg.rollout, g["rollout"]
    per = per_pod("rollout", "rollout", ro.ray_resources)
    assert (ro.min_workers, ro.num_workers, ro.max_workers) == (
        rg["minReplicas"] * per,
        rg["replicas"] * per,
        rg["maxReplicas"] * per,
    ), "rollout.min/num/max_workers must match the rollout group's minReplicas/replicas/max"
    assert gpus("rollout") == per * ro.num_gpus_per_worker

    le, lg = cfg.learner, g["learner"]
    ranks = per_pod("learner", "learner", le.ray_resources)
    assert lg["minReplicas"] == lg["replicas"] == lg["maxReplicas"], "the learner is fixed"
    assert le.num_ranks == lg["replicas"] * ranks
    assert gpus("learner") == ranks * le.num_gpus_per_rank
    assert gpus("head") == 0

    head = container(g["head"])
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["trainer-metrics"] == cfg.trainer.metrics_port > 0
    assert ports["buffer-metrics"] == cfg.buffer.metrics_port > 0
    assert ports["serve"] == cfg.reward.http_port
    assert cfg.trainer.metrics_host == cfg.buffer.host == cfg.reward.http_host == "0.0.0.0"
    for name, group in g.items():
        exported = int(group["rayStartParams"]["metrics-export-port"])
        by_name = {p["name"]: p["containerPort"] for p in container(group)["ports"]}
        assert by_name["metrics"] == exported, f"{name}: metrics port != metrics-export-port"

    url = urlsplit(cfg.buffer.redis_url)
    assert url.scheme in ("redis", "rediss") and url.password is None and url.username is None
    redis_sets = [
        o for o in objects if o["kind"] == "StatefulSet" and "redis" in o["metadata"]["name"]
    ]
    if redis_sets:
        service = next(
            o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == url.hostname
        )
        assert service["spec"]["ports"][0]["port"] == (url.port or 6379)
        assert redis_sets[0]["spec"]["serviceName"] == url.hostname
    else:
        assert url.hostname not in ("localhost", "127.0.0.1")

    env = head.get("env", [])
    assert _secret_ref(env, "SHUFFLE_R1_BUFFER_TOKEN") is not None
    assert _secret_ref(env, "SHUFFLE_R1_REWARD_TOKEN") is not None, "the endpoint needs a token"
    assert spec["authOptions"] == {"mode": "token", "secretName": spec["authOptions"]["secretName"]}
    b = cfg.buffer
    for key in ("tls_cert", "tls_key", "tls_ca_cert", "tls_client_ca", "tls_client_cert",
                "tls_client_key"):  # fmt: skip
        path = getattr(b, key)
        assert not path or _mounted(path, head), f"buffer.{key}={path} is not mounted on the head"
    if redis_sets:
        assert _secret_ref(env, "SHUFFLE_R1_REDIS_PASSWORD") is not None

    if Path(le.model_path).is_absolute():
        for name, group in g.items():
            assert _mounted(le.model_path, container(group)), f"{name} lacks {le.model_path}"
    else:
        from shuffle_r1.models import SMOLLM2, TINY_LLAMA  # imports torch: only when needed

        assert le.model_path in (SMOLLM2, TINY_LLAMA), f"unknown model {le.model_path!r}"
    for name in ("head", "learner"):
        assert _mounted(cfg.trainer.output_dir, container(g[name])), (
            f"{name} writes checkpoints to {cfg.trainer.output_dir}, which is not mounted"
        )
    for path in (cfg.data.train_path, cfg.data.val_path):
        assert (ROOT / path).is_file(), f"{path} is not in the image (/app/{path})"


def assert_relabel_rule(rules: list[dict[str, Any]], camel: bool) -> None:
    """``rules`` contain shuffle_r1.metric_catalog.RAY_PREFIX_RELABEL on ``__name__``."""
    src, target = ("sourceLabels", "targetLabel") if camel else ("source_labels", "target_label")
    matching = [
        r
        for r in rules
        if r.get(src) == ["__name__"]
        and r.get(target) == "__name__"
        and r.get("regex") == RAY_PREFIX_RELABEL["regex"]
        and r.get("replacement") == RAY_PREFIX_RELABEL["replacement"]
        and r.get("action", "replace").lower() == "replace"
    ]
    assert matching, f"no {RAY_PREFIX_RELABEL} rule in {rules}"
