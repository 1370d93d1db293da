"""A Redis that refuses the run is an error, never a reason to start a stand-in (issue #20,
finding 8): the run would train on a private Redis and exit 0 while the data the user
pointed at is never used. Only a loopback URL where nothing listens gets the stand-in."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.embedded_redis import EmbeddedRedis
from services.trainer.bootstrap import redis_for_run
from shuffle_r1.config import BufferConfig
from shuffle_r1.net import free_port

PASSWORD = "right-5d1e"


def test_wrong_password_is_an_error(tmp_path: Path) -> None:
    with EmbeddedRedis(password=PASSWORD) as redis:
        for url in (
            f"redis://:wrong-password@127.0.0.1:{redis.port}/0",
            f"redis://127.0.0.1:{redis.port}/0",  # none given, one required
        ):
            with pytest.raises(RuntimeError) as info:
                redis_for_run(BufferConfig(redis_url=url), tmp_path / "redis")
            message = str(info.value)
            assert "refuses this run" in message and "buffer.redis_url" in message
            assert "wrong-password" not in message  # redacted
        assert not (tmp_path / "redis").exists()  # no stand-in was started
        url, started = redis_for_run(
            BufferConfig(redis_url=f"redis://:{PASSWORD}@127.0.0.1:{redis.port}/0"), tmp_path
        )
        assert started is None and f":{redis.port}/" in url


def test_nothing_listening_on_loopback_starts_a_private_redis(tmp_path: Path) -> None:
    url, started = redis_for_run(
        BufferConfig(redis_url=f"redis://127.0.0.1:{free_port()}/0"), tmp_path / "redis"
    )
    try:
        assert started is not None and url == started.url
        assert (tmp_path / "redis").is_dir()
    finally:
        if started is not None:
            started.close()


def test_remote_redis_that_does_not_answer_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no Redis answers"):
        redis_for_run(BufferConfig(redis_url="redis://192.0.2.1:6379/0"), tmp_path)  # TEST-NET
