"""Loopback by default, the shared token, TLS."""

import datetime
import ipaddress
import socket

import grpc
import pytest
from buffer_helpers import random_groups
from grpc_health.v1 import health_pb2

from services.replay_buffer.client import ReplayBufferClient

SERVING = health_pb2.HealthCheckResponse.SERVING


def outward_ip() -> str | None:
    """This machine's non-loopback address, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent for UDP connect
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_binds_loopback_unless_told(start_buffer):
    ip = outward_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    loopback = start_buffer()
    everywhere = start_buffer(host="0.0.0.0", auth_token="not-for-strangers")
    with ReplayBufferClient(f"{ip}:{everywhere.port}", timeout_s=5, retries=0) as client:
        assert client.health() == SERVING  # the probe itself works (health needs no token)
    with ReplayBufferClient(f"{ip}:{loopback.port}", timeout_s=1, retries=0) as client:
        with pytest.raises(grpc.RpcError) as info:
            client.health()
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_shared_token(start_buffer, run_id):
    buffer = start_buffer(auth_token="s3cret")
    groups = random_groups(run_id, 0, 2)
    for token in (None, "wrong"):
        with ReplayBufferClient(buffer.address, token=token, retries=0) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.put_groups(groups)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "authorization: Bearer" in info.value.details()
            assert client.health() == SERVING  # health checks need no token
    assert buffer.metric("shuffle_r1_buffer_requests_total", method="PutGroups",
                         code="UNAUTHENTICATED") == 2  # fmt: skip
    assert buffer.client.put_groups(groups).stored == 2  # the fixture's client has the token
    assert buffer.client.sample(run_id, 0, policy_version=0).groups == 2


def make_tls(tmp_path):
    """A CA, and a server certificate it signs for 127.0.0.1 / localhost (PEM files)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject, issuer, key, signer, ca, names=()):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), False)
        return builder.sign(signer, hashes.SHA256())

    def pem(cert):
        return cert.public_bytes(serialization.Encoding.PEM)

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("test CA", "test CA", ca_key, ca_key, ca=True)
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = certificate("localhost", "test CA", key, ca_key, ca=False, names=names)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = certificate("other CA", "other CA", other_key, other_key, ca=True)
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key", "other")}
    paths["ca"].write_bytes(pem(ca))
    paths["cert"].write_bytes(pem(server))
    paths["other"].write_bytes(pem(other_ca))
    paths["key"].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def test_tls(start_buffer, run_id, tmp_path):
    paths = make_tls(tmp_path)
    buffer = start_buffer(tls_cert=str(paths["cert"]), tls_key=str(paths["key"]))
    with ReplayBufferClient(buffer.address, root_cert=paths["ca"], retries=0) as client:
        assert client.put_groups(random_groups(run_id, 0, 2)).stored == 2
        assert client.sample(run_id, 0, policy_version=0).groups == 2
    for root in (paths["other"].read_bytes(), None):  # untrusted certificate; plaintext
        with ReplayBufferClient(buffer.address, root_cert=root, timeout_s=3, retries=0) as client:
            with pytest.raises(grpc.RpcError) as info:
                client.stats(run_id)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
