"""Seconds per test file from a pytest JUnit XML report, as ``tests/durations.json``.

``make test`` hands test files to its two processes heaviest first, by that file
(tests/conftest.py). Regenerate it after adding or changing a long test::

    make test PYTEST_ARGS=--junitxml=/tmp/junit.xml
    .venv/bin/python scripts/test_durations.py /tmp/junit.xml > tests/durations.json
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from collections import Counter


def file_seconds(junit_xml: str) -> dict[str, float]:
    """``{"tests/.../test_x.py": seconds}``, setup, call and teardown of every test summed,
    heaviest first. A test class's name (capitalised) is dropped from ``classname``."""
    seconds: Counter[str] = Counter()
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        parts = [p for p in case.get("classname", "").split(".") if p and not p[0].isupper()]
        seconds["/".join(parts) + ".py"] += float(case.get("time", 0.0))
    return {name: round(s, 1) for name, s in seconds.most_common()}


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: test_durations.py JUNIT_XML")
    json.dump(file_seconds(sys.argv[1]), sys.stdout, indent=1)
    sys.stdout.write("\n")
