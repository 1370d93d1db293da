"""scripts/setup.sh checks the Python version before it creates a venv or installs anything."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_an_old_python_is_refused_before_anything_is_installed(tmp_path: Path) -> None:
    old = tmp_path / "python3.10"  # answers as Python 3.10 does to the script's two questions
    old.write_text(
        '#!/bin/sh\n[ "$1" = -V ] && { echo "Python 3.10.14"; exit 0; }\n'
        "exec /usr/bin/env python3 -c 'import sys; sys.exit(1)'\n"
    )
    old.chmod(0o755)
    venv = tmp_path / "venv"
    done = subprocess.run(
        ["bash", "scripts/setup.sh"],
        cwd=ROOT,
        env={**os.environ, "PYTHON": str(old), "VENV": str(venv)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"setup: {old} is Python 3.10.14; shuffle-r1 needs Python >= 3.11" in done.stderr
    assert not venv.exists()
