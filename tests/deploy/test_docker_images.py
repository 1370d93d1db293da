"""The Dockerfiles, checked without a Docker engine: hadolint (with ShellCheck on every RUN),
and what the images need from this repository: every COPY source exists and is in the build
context, scripts/setup.sh installs from the pins, the gRPC code is generated as the Makefile
does, the user is the chart's non-root uid, and the entrypoint and ``ray`` are on PATH."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "deploy" / "docker"
IMAGES = {"Dockerfile": "cuda", "Dockerfile.cpu": "cpu"}
VENV_BIN = "/app/.venv/bin"


def commands(name: str) -> list[dockerfile.Command]:
    return list(dockerfile.parse_file(str(DOCKER / name)))


def runs(cmds: list[dockerfile.Command]) -> list[str]:
    return [" ".join(c.value) for c in cmds if c.cmd == "RUN"]


def ignore_patterns(name: str) -> list[str]:
    lines = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics: the last pattern that matches the path or one of
    its parent folders decides; ``!`` re-includes; ``**`` spans folders."""

    def to_regex(pattern: str) -> re.Pattern[str]:
        out = ""
        for part in re.split(r"(\*\*/|\*\*|\*|\?)", pattern.strip("/")):
            out += {"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(
                part, re.escape(part)
            )
        return re.compile(out)

    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = to_regex(raw.lstrip("!"))
        if any(rx.fullmatch(p) for p in prefixes):
            result = not negate
    return result


@pytest.mark.parametrize("name", IMAGES)
def test_hadolint_is_clean(name: str) -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    done = subprocess.run(
        [str(hadolint), "--config", str(DOCKER / "hadolint.yaml"), str(DOCKER / name)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("name", IMAGES)
def test_copy_sources_exist_and_are_in_the_context(name: str) -> None:
    patterns = ignore_patterns(name)
    copies = [c for c in commands(name) if c.cmd in ("COPY", "ADD")]
    assert copies
    for c in copies:
        assert c.cmd == "COPY", f"line {c.start_line}: use COPY, not ADD"
        assert not any(f.startswith("--from") for f in c.flags)
        assert "--chown=1000:1000" in c.flags, f"line {c.start_line}: files belong to uid 1000"
        for source in c.value[:-1]:
            assert (ROOT / source).exists(), f"line {c.start_line}: {source} does not exist"
            assert not ignored(source, patterns), f"line {c.start_line}: {source} is ignored"
    copied = {Path(s).parts[0] for c in copies for s in c.value[:-1]}
    assert {"configs", "data", "requirements", "scripts", "pyproject.toml"} <= copied


def test_the_two_ignore_files_are_the_same() -> None:
    assert ignore_patterns("Dockerfile") == ignore_patterns("Dockerfile.cpu")


def test_what_git_ignores_stays_out_of_the_context() -> None:
    """Every file and folder git ignores in this checkout (the venv, caches, generated gRPC
    code, outputs) is left out of the build context."""
    done = subprocess.run(
        ["git", "status", "--ignored", "--porcelain", "--untracked-files=normal"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    paths = [line[3:] for line in done.stdout.splitlines() if line.startswith("!! ")]
    assert paths, "git reports nothing ignored: the check would be empty"
    patterns = ignore_patterns("Dockerfile")
    leaking = [p for p in paths if not ignored(p, patterns)]
    assert not leaking, f"these would enter the image's build context: {leaking}"
    assert not ignored("shuffle_r1/config/schema.py", patterns)


@pytest.mark.parametrize("name,kind", IMAGES.items())
def test_installs_through_setup_sh_and_the_pins(name: str, kind: str) -> None:
    cmds = commands(name)
    setup = [i for i, c in enumerate(cmds) if c.cmd == "RUN" and "scripts/setup.sh" in c.value[0]]
    assert len(setup) == 1, "the image installs with scripts/setup.sh, once"
    run = cmds[setup[0]].value[0]
    assert ("SHUFFLE_R1_CUDA=1" in run) == (kind == "cuda")
    # the runtime, the engine's and the trackers' extras: no dev or deploy extras (pytest,
    # hadolint, ...)
    assert "SHUFFLE_R1_EXTRAS=trackers " in run, "the image installs the runtime only"
    setup_sh = (ROOT / "scripts" / "setup.sh").read_text()
    assert "EXTRAS=${SHUFFLE_R1_EXTRAS-trackers,dev,deploy}" in setup_sh
    assert "pip install" not in " ".join(runs(cmds)), "installs go through setup.sh and the pins"
    # everything setup.sh reads is copied before it runs: the pins, pyproject (with README),
    # and the packages it installs editable
    before = {Path(s).parts[0] for c in cmds[: setup[0]] if c.cmd == "COPY" for s in c.value[:-1]}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages | {"pyproject.toml", "README.md", "requirements", "scripts"} <= before
    assert "requirements/pins.txt" in setup_sh


@pytest.mark.parametrize("name", IMAGES)
def test_generates_the_grpc_code_as_the_makefile_does(name: str) -> None:
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^protos:.*\n\t@?(.+)$", makefile, re.MULTILINE)
    assert recipe, "the Makefile has no protos target"
    command = recipe.group(1).replace("$(PY)", ".venv/bin/python")
    assert any(command in r for r in runs(commands(name))), f"{name} does not run {command}"


@pytest.mark.parametrize("name,kind", IMAGES.items())
def test_base_image_and_python(name: str, kind: str) -> None:
    cmds = commands(name)
    args = {
        a.split("=", 1)[0]: a.split("=", 1)[1]
        for c in cmds
        if c.cmd == "ARG"
        for a in c.value
        if "=" in a
    }
    (base,) = [c.value[0] for c in cmds if c.cmd == "FROM"]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    if kind == "cuda":
        assert re.fullmatch(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-ubuntu[\d.]+", base), base
        assert any("python3.11 -m venv /app/.venv" in r for r in runs(cmds))
    else:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", base), base


@pytest.mark.parametrize("name", IMAGES)
def test_runs_as_the_charts_user_with_the_project_on_path(name: str) -> None:
    cmds = commands(name)
    users = [c.value[0] for c in cmds if c.cmd == "USER"]
    assert users and users[-1] == "1000:1000", "the last USER is the non-root uid 1000"
    assert any("useradd --uid 1000 --gid 1000" in r for r in runs(cmds))
    chart = (ROOT / "helm" / "shuffle-r1" / "templates" / "_helpers.tpl").read_text()
    assert "runAsUser: 1000" in chart and "runAsGroup: 1000" in chart
    (workdir,) = [c.value[0] for c in cmds if c.cmd == "WORKDIR"]
    assert workdir == "/app"
    env: dict[str, str] = {}
    for c in cmds:
        if c.cmd == "ENV":
            env.update(zip(c.value[::2], c.value[1::2], strict=True))
    assert env["PATH"].split(":")[0] == VENV_BIN
    profile = [r for r in runs(cmds) if "/etc/profile.d/" in r]
    assert profile and f"export PATH={VENV_BIN}:$PATH" in profile[0], "bash -l keeps the venv"


@pytest.mark.parametrize("name", IMAGES)
def test_entrypoint_is_a_real_command(name: str) -> None:
    """ENTRYPOINT is a console script of this project, and `ray` (which KubeRay runs) is
    one of the pinned ray distribution's, both installed into /app/.venv/bin."""
    cmds = commands(name)
    (entry,) = [c for c in cmds if c.cmd == "ENTRYPOINT"]
    assert entry.json, "exec form, so signals reach the process"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entry.value[0] in scripts
    (cmd,) = [c for c in cmds if c.cmd == "CMD"]
    assert cmd.json and cmd.value == ("--help",)
    pins = (ROOT / "requirements" / "pins.txt").read_text()
    version = re.search(r"^ray\[[^]]*\]==(\S+)$", pins, re.MULTILINE)
    assert version, "ray is pinned"
    ray = importlib.metadata.distribution("ray")
    assert ray.version == version.group(1), "the installed ray is the pinned one"
    assert "ray" in {ep.name for ep in ray.entry_points if ep.group == "console_scripts"}
    values = yaml.safe_load((ROOT / "helm" / "shuffle-r1" / "values.yaml").read_text())
    assert values["rayVersion"] == version.group(1), "the chart's rayVersion is the image's"


@pytest.mark.parametrize(
    "name,tag", [("Dockerfile", "0.1.0-cuda"), ("Dockerfile.cpu", "0.1.0-cpu")]
)
def test_build_command_tags_what_the_chart_pulls(name: str, tag: str) -> None:
    """The build command in the Dockerfile and the README tags the image the chart's values
    name (values.yaml for CUDA, ci/cpu-demo-values.yaml for CPU)."""
    chart = ROOT / "helm" / "shuffle-r1"
    repository = yaml.safe_load((chart / "values.yaml").read_text())["image"]["repository"]
    build = f"docker build -f deploy/docker/{name} -t {repository}:{tag} ."
    assert build in (DOCKER / name).read_text()
    assert build in (ROOT / "README.md").read_text()
    values = chart / ("values.yaml" if tag.endswith("cuda") else "ci/cpu-demo-values.yaml")
    assert yaml.safe_load(values.read_text())["image"]["tag"] == tag
