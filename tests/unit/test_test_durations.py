"""The per-file durations that order the test files (scripts/test_durations.py,
tests/durations.json, tests/conftest.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.e2e.test_run" name="test_a" time="100.5"/>
<testcase classname="tests.e2e.test_run" name="test_b[x]" time="20.0"/>
<testcase classname="tests.unit.test_cfg.TestKeys" name="test_c" time="0.25"/>
<testcase classname="tests.unit.test_cfg" name="test_d" time="0.5"/>
</testsuite></testsuites>
"""


def test_seconds_are_summed_per_file_heaviest_first(tmp_path: Path) -> None:
    report = tmp_path / "junit.xml"
    report.write_text(JUNIT)
    done = subprocess.run(
        [sys.executable, "scripts/test_durations.py", str(report)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    seconds = json.loads(done.stdout)
    assert list(seconds.items()) == [("tests/e2e/test_run.py", 120.5),
                                     ("tests/unit/test_cfg.py", 0.8)]  # fmt: skip


def test_every_file_in_durations_json_exists() -> None:
    """A renamed or deleted file would silently lose its place at the front."""
    seconds = json.loads((ROOT / "tests" / "durations.json").read_text())
    assert seconds and all(s >= 0 for s in seconds.values())
    assert [name for name in seconds if not (ROOT / name).is_file()] == []
