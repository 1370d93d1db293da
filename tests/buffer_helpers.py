"""Helpers of the replay buffer tests: groups with reproducible contents, Redis key listing
and dumps, the service as a child process, TLS certificates, this machine's outward address."""

from __future__ import annotations

import datetime
import ipaddress
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import redis

from protos import replay_buffer_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]


def run_keys(client: redis.Redis, run_id: str) -> list[bytes]:
    """Every Redis key of ``run_id``."""
    return list(client.scan_iter(match=f"shuffle_r1:buffer:{{{run_id}}}:*", count=1000))


def make_group(
    run_id: str,
    step: int,
    prompt_id: str,
    rewards: Sequence[float],
    weight_version: int = 0,
    truncated: Sequence[bool] | None = None,
    response_tokens: int = 6,
    images: Sequence[pb.Image] = (),
) -> pb.Group:
    """A group whose token ids and log-probs are derived from its key (reproducible)."""
    rng = random.Random(f"{run_id}/{step}/{prompt_id}")
    rollouts = []
    for j, reward in enumerate(rewards):
        length = rng.randint(1, response_tokens)
        rollouts.append(
            pb.Rollout(
                token_ids=[rng.randrange(50_000) for _ in range(length)],
                logprobs=[-rng.random() * 5 for _ in range(length)],
                reward=reward,
                weight_version=weight_version,
                truncated=bool(truncated[j]) if truncated else False,
            )
        )
    return pb.Group(
        run_id=run_id,
        step=step,
        prompt_id=prompt_id,
        prompt_token_ids=[rng.randrange(50_000) for _ in range(rng.randint(1, 8))],
        answer="42",
        rollouts=rollouts,
        images=list(images),
    )


def random_groups(
    run_id: str, step: int, count: int, n: int = 8, seed: int = 0, weight_version: int = 0
) -> list[pb.Group]:
    """``count`` groups of ``n`` rollouts with 0/1/0.5 rewards, prompt ids ``p000``...."""
    rng = random.Random(seed)
    return [
        make_group(run_id, step, f"p{i:03d}", [rng.choice([0.0, 0.5, 1.0]) for _ in range(n)],
                   weight_version=weight_version,
                   truncated=[rng.random() < 0.2 for _ in range(n)])
        for i in range(count)
    ]  # fmt: skip


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint, written here independently of the
    server's encoder."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def dump_run(client: redis.Redis, run_id: str) -> dict[bytes, bytes]:
    """Every key of ``run_id`` with its Redis DUMP: type, content and encoding, byte for byte
    (for one server's data before and after; a reload may re-encode the same content)."""
    return {key: client.dump(key) for key in sorted(run_keys(client, run_id))}  # type: ignore[misc]


def run_contents(client: redis.Redis, run_id: str) -> dict[bytes, object]:
    """Every key of ``run_id`` with its content (hash: field → value; sorted set: members
    with scores), independent of how Redis encodes it."""
    read = {b"hash": client.hgetall, b"string": client.get,
            b"zset": lambda k: client.zrange(k, 0, -1, withscores=True)}  # fmt: skip
    return {key: read[client.type(key)](key) for key in sorted(run_keys(client, run_id))}  # type: ignore[index]


def spawn_service(
    redis_url: str, *flags: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """``python -m services.replay_buffer.cli serve --redis-url URL FLAGS`` as a child
    process (``--port 0`` unless FLAGS give one), not waiting for it."""
    port = () if "--port" in flags else ("--port", "0")
    return subprocess.Popen(
        [sys.executable, "-m", "services.replay_buffer.cli", "serve", "--redis-url", redis_url,
         *port, *flags],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def service_address(process: subprocess.Popen[str], timeout_s: float = 60) -> str:
    """The ``host:port`` a spawned service reports once it listens (waits up to timeout_s)."""
    assert process.stdout is not None and process.stderr is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            line = process.stdout.readline()
            if line.startswith("replay buffer listening on "):
                return line.split()[-1]
        if process.poll() is not None:
            raise RuntimeError(f"the service exited: {process.stderr.read()}")
    process.kill()
    raise RuntimeError(f"the service did not report its address in {timeout_s} s")


def start_service(
    redis_url: str, *flags: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[str], str]:
    """:func:`spawn_service`, then its address once it listens."""
    process = spawn_service(redis_url, *flags, env=env)
    return process, service_address(process)


def kill9(process: subprocess.Popen[str]) -> None:
    """SIGKILL ``process`` and reap it."""
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL


def scrape(port: int, host: str = "127.0.0.1") -> str:
    """The text of ``http://host:port/metrics``."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The samples of a Prometheus text exposition: (name, labels) → value."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def outward_ip() -> str | None:
    """This machine's non-loopback IPv4 address, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent for UDP connect
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def make_tls(folder: Path) -> dict[str, Path]:
    """PEM files: a CA (``ca``), a server certificate it signs for 127.0.0.1 / localhost
    (``cert``, ``key``), a client certificate it signs (``client_cert``, ``client_key``) and
    another CA that signed none of them (``other``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject, issuer, key, signer, ca, names=()):  # type: ignore[no-untyped-def]
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

    def write(name: str, data: bytes) -> None:
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(data)

    def write_key(name: str, key: ec.EllipticCurvePrivateKey) -> None:
        write(name, key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))  # fmt: skip

    pem = serialization.Encoding.PEM
    paths: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    write("ca", certificate("test CA", "test CA", ca_key, ca_key, ca=True).public_bytes(pem))
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for name, subject in (("", "localhost"), ("client_", "test client")):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(subject, "test CA", key, ca_key, ca=False, names=names)
        write(f"{name}cert", cert.public_bytes(pem))
        write_key(f"{name}key", key)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = certificate("other CA", "other CA", other_key, other_key, ca=True)
    write("other", other.public_bytes(pem))
    return paths
