"""metrics.jsonl lines are written whole (issue #20, finding 7): a full disk leaves the file
ending with a whole line, and a torn last line is skipped by the reader, cut by the writer."""

from __future__ import annotations

import errno
import logging
import resource
import signal
from pathlib import Path

import pytest

from services.trainer.metrics import MetricsWriter, read_metrics
from shuffle_r1.integrity import OutputWriteError
from tests.full_disk import fill, small_tmpfs

ROW = {f"metric/{i}": float(i) for i in range(200)}  # ~3.6 KB a line


def test_a_full_disk_leaves_the_metrics_file_ending_with_a_whole_line(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "out", "2m") as mounted:
        path = tmp_path / "out" / "metrics.jsonl"
        writer = MetricsWriter(path)
        if mounted:
            fill(tmp_path / "out", leave=8192)  # two pages: the third line fits in part
            limit = None
        else:  # no mount: RLIMIT_FSIZE cuts the write part way as a full disk would
            limit = resource.getrlimit(resource.RLIMIT_FSIZE)
            previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (8192, limit[1]))
        written = 0
        try:
            with pytest.raises(OutputWriteError) as raised:
                for step in range(10):
                    writer.write(step, ROW)
                    written += 1
        finally:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, limit)
                signal.signal(signal.SIGXFSZ, previous)
        assert raised.value.errno in (errno.ENOSPC, errno.EFBIG)
        assert f"metrics of step {written}" in str(raised.value)
        assert str(path) in str(raised.value) and "free on that filesystem" in str(raised.value)
        data = path.read_bytes()
        assert written == 2 and data.endswith(b"\n") and data.count(b"\n") == written
        assert [r["step"] for r in read_metrics(path)] == [0, 1]


def test_a_torn_last_line_is_skipped_by_the_reader_and_cut_by_the_writer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "metrics.jsonl"
    MetricsWriter(path).write(0, {"a": 1.0})
    with path.open("a") as f:
        f.write('{"step": 1, "a": 2.')  # a line an older version left half written
    with caplog.at_level(logging.WARNING, "services.trainer.metrics"):
        assert [r["step"] for r in read_metrics(path)] == [0]
        writer = MetricsWriter(path)
    assert "torn" in caplog.text
    writer.write(1, {"a": 3.0})
    assert [r["a"] for r in read_metrics(path)] == [1.0, 3.0]
    path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
