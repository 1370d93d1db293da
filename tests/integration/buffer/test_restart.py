"""The service as its own process: a bad setting stops it at start, naming the key. (Its
crash and restart, and Redis's, are the fault tests in tests/faults.)"""

import subprocess
import sys

from buffer_helpers import ROOT


def test_bad_settings_exit_with_the_key():
    result = subprocess.run(
        [sys.executable, "-m", "services.replay_buffer.cli", "serve", "--keep-steps", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "buffer.keep_steps=0 must be in [1, " in result.stderr
