"""The replay buffer is closed by default (issue #20): it listens on loopback only unless
told otherwise, a second server cannot share its port, and with ``buffer.tls_client_ca``
only clients holding a certificate that CA signed get through (mutual TLS)."""

from __future__ import annotations

import urllib.error

import grpc
import pytest
from buffer_helpers import make_tls, outward_ip, random_groups, scrape
from grpc_health.v1 import health_pb2

from services.replay_buffer.client import ReplayBufferClient
from shuffle_r1.net import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
REFUSED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_binds_loopback_unless_told(start_buffer):
    """Reached from this machine's non-loopback address, a buffer with the default host
    refuses the connection (gRPC and metrics); one told to bind 0.0.0.0 answers."""
    ip = outward_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    loopback = start_buffer(metrics_port=free_port())
    everywhere = start_buffer(host="0.0.0.0", auth_token="not-for-strangers",
                              metrics_port=free_port())  # fmt: skip
    with ReplayBufferClient(f"{ip}:{everywhere.port}", timeout_s=5, retries=0) as client:
        assert client.health() == SERVING  # the probe itself works (health needs no token)
    assert "shuffle_r1_buffer_requests_total" in scrape(everywhere.cfg.metrics_port, host=ip)
    with ReplayBufferClient(f"{ip}:{loopback.port}", timeout_s=1, retries=0) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.health()
        assert info.value.code() in REFUSED
    assert "shuffle_r1_buffer_requests_total" in scrape(loopback.cfg.metrics_port)
    with pytest.raises(urllib.error.URLError):  # connection refused: bound to 127.0.0.1 only
        scrape(loopback.cfg.metrics_port, host=ip)


def test_a_second_buffer_cannot_take_a_used_port(start_buffer, run_id):
    """gRPC binds with SO_REUSEPORT unless told not to: a second server on the port would
    start and silently take part of the traffic."""
    first = start_buffer(port=free_port())
    with pytest.raises(RuntimeError) as info:
        start_buffer(port=first.port)
    assert f"the replay buffer cannot bind 127.0.0.1:{first.port}" in str(info.value)
    assert "another buffer?" in str(info.value)
    assert first.client.put_groups(random_groups(run_id, 0, 2)).stored == 2  # still serves


def test_mutual_tls_refuses_clients_without_a_certificate(start_buffer, run_id, tmp_path):
    (tmp_path / "ours").mkdir()
    (tmp_path / "theirs").mkdir()
    ours, theirs = make_tls(tmp_path / "ours"), make_tls(tmp_path / "theirs")
    buffer = start_buffer(tls_cert=str(ours["cert"]), tls_key=str(ours["key"]),
                          tls_client_ca=str(ours["ca"]))  # fmt: skip
    trusted = {"client_cert": ours["client_cert"], "client_key": ours["client_key"]}
    with ReplayBufferClient(buffer.address, root_cert=ours["ca"], retries=0, **trusted) as client:
        assert client.put_groups(random_groups(run_id, 0, 2)).stored == 2
        assert client.sample(run_id, 0, policy_version=0).groups == 2
    strangers = [
        {},  # TLS, but no client certificate
        {"client_cert": theirs["client_cert"], "client_key": theirs["client_key"]},  # other CA
    ]
    for certificate in strangers:
        with ReplayBufferClient(buffer.address, root_cert=ours["ca"], timeout_s=3, retries=0,
                                **certificate) as client:  # fmt: skip
            with pytest.raises(grpc.RpcError) as info:
                client.health()  # refused in the handshake: health is no exception
            assert info.value.code() in REFUSED, certificate
    with pytest.raises(RuntimeError) as error:  # client certificates need TLS
        start_buffer(tls_client_ca=str(ours["ca"]))
    assert "buffer.tls_client_ca is set but buffer.tls_cert is not" in str(error.value)
