"""Security rules checked when a config is loaded (issue #20, README "Security"): a service
bound beyond loopback needs its token, a local Ray beyond loopback needs token auth, the
reward endpoint's limits and the buffer's TLS settings are in range, and no secret is ever
written to disk or printed."""

from __future__ import annotations

from pathlib import Path

import pytest

from shuffle_r1.config import (
    BUFFER_TOKEN_ENV,
    RAY_AUTH_MODE_ENV,
    REWARD_TOKEN_ENV,
    ConfigError,
    is_loopback,
    load_config,
    save_config,
    to_yaml,
)


@pytest.fixture(autouse=True)
def _no_secrets_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (BUFFER_TOKEN_ENV, REWARD_TOKEN_ENV, RAY_AUTH_MODE_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("LOCALHOST", True), ("0.0.0.0", False), ("::", False),
     ("10.0.0.5", False), ("shuffle-r1-head", False), ("", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


SERVICES = [("buffer.host", "buffer.auth_token", BUFFER_TOKEN_ENV),
            ("reward.http_host", "reward.http_token", REWARD_TOKEN_ENV)]  # fmt: skip


@pytest.mark.parametrize(("host_key", "token_key", "env"), SERVICES)
def test_a_service_beyond_loopback_needs_its_token(
    host_key: str, token_key: str, env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [f"{host_key}=0.0.0.0"])
    message = str(info.value)
    assert f"{host_key}='0.0.0.0' is not a loopback address" in message
    assert token_key in message and f"${env}" in message and "127.0.0.1" in message
    load_config(None, [f"{host_key}=0.0.0.0", f"{token_key}=s3cret"])
    for host in ("127.0.0.2", "::1", "localhost"):
        load_config(None, [f"{host_key}={host}"])
    monkeypatch.setenv(env, "from-a-kubernetes-secret")
    load_config(None, [f"{host_key}=10.1.2.3"])


def test_a_local_ray_beyond_loopback_needs_token_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["cluster.host=0.0.0.0", "cluster.auth_mode=disabled"])
    message = str(info.value)
    assert "cluster.host='0.0.0.0' is not a loopback address" in message
    assert "run code as the training user" in message and "cluster.auth_mode=token" in message
    load_config(None, ["cluster.host=0.0.0.0", "cluster.auth_mode=token"])
    load_config(
        None, ["cluster.host=0.0.0.0", "cluster.auth_mode=disabled", "cluster.ray_address=auto"]
    )  # joins a cluster: binds nothing
    # the trainer lets $RAY_AUTH_MODE win over cluster.auth_mode: so does the check
    monkeypatch.setenv(RAY_AUTH_MODE_ENV, "disabled")
    with pytest.raises(ConfigError, match=r"\$RAY_AUTH_MODE='disabled'"):
        load_config(None, ["cluster.host=0.0.0.0", "cluster.auth_mode=token"])
    monkeypatch.setenv(RAY_AUTH_MODE_ENV, "token")
    load_config(None, ["cluster.host=0.0.0.0", "cluster.auth_mode=disabled"])


@pytest.mark.parametrize(
    ("overrides", "says"),
    [(["reward.max_request_kb=0"], "reward.max_request_kb=0 must be in [1, 65536]"),
     (["reward.max_request_kb=65537"], "reward.max_request_kb=65537 must be in [1, 65536]"),
     (["reward.request_timeout_s=0"], "reward.request_timeout_s=0.0 must be in (0.0, 3600.0]"),
     (["reward.request_timeout_s=3601"], "reward.request_timeout_s=3601.0 must be in"),
     (["reward.timeout_s=30", "reward.request_timeout_s=10"],
      "reward.request_timeout_s=10.0 must be > reward.timeout_s + 2 = 32"),
     (["reward.timeout_s=30", "reward.request_timeout_s=32"],  # a hung item: 504, not a 0
      "reward.request_timeout_s=32.0 must be > reward.timeout_s + 2 = 32"),
     (["buffer.tls_ca_cert=/ca.pem"], "buffer.tls_ca_cert is set but buffer.tls_cert is not"),
     (["buffer.tls_client_ca=/ca.pem"], "buffer.tls_client_ca is set but buffer.tls_cert is not"),
     (["buffer.tls_client_cert=/c.pem", "buffer.tls_client_key=/k.pem"],
      "buffer.tls_client_cert is set but buffer.tls_cert is not"),
     (["buffer.tls_cert=/s.pem", "buffer.tls_key=/s.key", "buffer.tls_client_key=/k.pem"],
      "buffer.tls_client_cert and buffer.tls_client_key must be given together")],
)  # fmt: skip
def test_reward_endpoint_and_buffer_tls_settings(overrides: list[str], says: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert says in str(info.value)


def test_the_allowed_reward_endpoint_and_mutual_tls_settings_load() -> None:
    cfg = load_config(None, [
        "reward.max_request_kb=1", "reward.request_timeout_s=3600",
        "buffer.tls_cert=/s.pem", "buffer.tls_key=/s.key", "buffer.tls_ca_cert=/ca.pem",
        "buffer.tls_client_ca=/ca.pem", "buffer.tls_client_cert=/c.pem",
        "buffer.tls_client_key=/c.key",
    ])  # fmt: skip
    assert (cfg.reward.max_request_kb, cfg.buffer.tls_client_key) == (1, "/c.key")


PASSWORD = "hunter2-\N{GREEK SMALL LETTER BETA}"  # unusual, so a leak is easy to find
SECRETS = [
    f"buffer.redis_url=rediss://learner-7:{PASSWORD}@redis.internal:6380/0?password={PASSWORD}",
    "buffer.auth_token=buffer-token-7f3a",
    "reward.http_token=reward-token-91c2",
]


def test_saved_config_holds_no_secret(tmp_path: Path) -> None:
    """Issue #20 finding 8: the Redis password was written in clear to the run's config."""
    cfg = load_config(None, SECRETS)
    path = tmp_path / "config.yaml"
    save_config(cfg, path, comment="precision: test")
    text = path.read_text()
    for secret in (PASSWORD, "learner-7", "buffer-token-7f3a", "reward-token-91c2"):
        assert secret not in text
    assert "redis_url: rediss://***@redis.internal:6380/0?password=***" in text
    assert "auth_token: '***'" in text and "http_token: '***'" in text
    assert text.startswith("# precision: test\n")
    saved = load_config(path)  # still a recipe
    assert (saved.buffer.auth_token, saved.reward.http_token) == ("***", "***")
    assert saved.trainer == cfg.trainer and saved.algorithm == cfg.algorithm
    assert cfg.buffer.auth_token == "buffer-token-7f3a"  # the run's own config is untouched


def test_printed_config_holds_no_secret_and_unset_tokens_stay_empty() -> None:
    text = to_yaml(load_config(None, SECRETS))
    assert PASSWORD not in text and "buffer-token-7f3a" not in text
    plain = to_yaml(load_config())
    assert "auth_token: ''" in plain and "http_token: ''" in plain and "***" not in plain
