"""The import layering of docs/architecture.md, checked on every import statement:
``shuffle_r1`` ← ``actors`` ← ``services`` ← ``bench``, nothing imports from a package to its
right, and the library (``shuffle_r1``) uses neither Ray, Redis, gRPC nor the generated
``protos``. Imports inside functions count, and so do modules named to ``importlib``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# package -> top-level modules it must never import
FORBIDDEN = {
    "shuffle_r1": {"actors", "services", "bench", "tests", "protos", "ray", "redis", "grpc"},
    "actors": {"services", "bench", "tests"},
    "services": {"bench", "tests"},
}


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, and of every literal module name given to
    ``importlib.import_module``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
        elif isinstance(node, ast.Tuple | ast.List) and all(
            isinstance(e, ast.Constant) and isinstance(e.value, str) for e in node.elts
        ):
            # module names kept in a table for importlib (e.g. a CLI's subcommand modules)
            found += [
                (node.lineno, e.value)
                for e in node.elts
                if isinstance(e, ast.Constant)
                and isinstance(e.value, str)
                and e.value.split(".")[0] in {"actors", "services", "bench"}
                and e.value.replace(".", "").replace("_", "").isalnum()
                and "." in e.value
            ]
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_to_its_right(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no Python files under {package}/"
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in files
        for line, module in imported_modules(path)
        if module.split(".")[0] in FORBIDDEN[package]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_imports_in_functions_and_importlib_tables(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import importlib\n"
        "def f():\n"
        "    from services.trainer import loop\n"
        "    import ray\n"
        "MODULES = ('services.replay_buffer.cli', 'not a module')\n"
        "importlib.import_module('actors.reward')\n"
    )
    modules = {m for _, m in imported_modules(sample)}
    assert {"services.trainer", "ray", "services.replay_buffer.cli", "actors.reward"} <= modules
    assert "not a module" not in modules
