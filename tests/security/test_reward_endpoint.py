"""The reward role's HTTP endpoint (issue #20, finding 2) against a real Ray, a real Serve
proxy and real HTTP requests: a bearer token, a body size limit that refuses before reading
the body, a per-request deadline, and a proxy bound to loopback unless told otherwise.

One reward application serves the whole module (Serve starts once per module).
"""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from buffer_helpers import outward_ip

from actors.reward import GRACE_S, MAX_HTTP_ITEMS, RewardPool, ScoreRequest
from actors.serving import proxy_host
from shuffle_r1.config import RewardConfig, is_loopback

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]

TOKEN = "test-reward-token-0123456789abcdef"
LIMIT_KB = 64
DEADLINE_S = 8.0
# "hang" in a response makes the function sleep for an hour; anything else scores 0.5
HANGS = "tests.unit.actors.reward_fns:hangs"
OK_ITEM = {"response": "fine", "reference_answer": "1"}


@pytest.fixture(scope="module")
def pool(ray_cluster: None) -> Iterator[RewardPool]:
    cfg = RewardConfig(
        function=HANGS,
        num_workers=1,
        http_port=0,
        http_route="/test-security-reward",
        http_token=TOKEN,
        max_request_kb=LIMIT_KB,
        request_timeout_s=DEADLINE_S,
        timeout_s=60.0,  # the hung call outlives the request's deadline
    )
    pool = RewardPool(cfg, run_id="test-security-reward")
    yield pool
    pool.shutdown()


def connect(pool: RewardPool, timeout_s: float = 60.0) -> http.client.HTTPConnection:
    url = urlsplit(pool.url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout_s)


def post(
    pool: RewardPool, body: object, token: str | None = TOKEN, scheme: str = "Bearer"
) -> tuple[int, dict, dict[str, str]]:
    """POST ``body`` as JSON (bytes as they are); status, parsed answer and headers."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"{scheme} {token}"
    conn = connect(pool)
    try:
        conn.request("POST", urlsplit(pool.url).path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read()), dict(response.getheaders())
    finally:
        conn.close()


def read_response(sock: socket.socket, timeout_s: float = 60.0) -> tuple[int, dict]:
    """Status and JSON body of the HTTP response waiting on ``sock``."""
    sock.settimeout(timeout_s)
    data = b""
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body[: _length(data)])


def _length(data: bytes) -> int:
    head = data.partition(b"\r\n\r\n")[0].decode("latin-1").lower()
    for line in head.split("\r\n"):
        if line.startswith("content-length:"):
            return int(line.split(":", 1)[1])
    return 0


def raw_request(pool: RewardPool, headers: dict[str, str]) -> socket.socket:
    """A socket that has sent a POST's request line and ``headers`` (and no body)."""
    url = urlsplit(pool.url)
    sock = socket.create_connection((url.hostname, url.port), timeout=60)
    lines = [f"POST {url.path} HTTP/1.1", f"Host: {url.hostname}:{url.port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def test_a_request_without_the_token_is_refused_401_and_with_it_scored(
    pool: RewardPool,
) -> None:
    status, answer, headers = post(pool, OK_ITEM, token=None)
    assert status == 401, answer
    assert "Authorization: Bearer <token>" in answer["error"]
    assert headers.get("www-authenticate", "").startswith("Bearer")
    wrong = "wrong-token-which-must-not-come-back"
    for token, scheme in ((wrong, "Bearer"), (TOKEN[:-1], "Bearer"), (TOKEN, "Basic")):
        status, answer, _ = post(pool, OK_ITEM, token=token, scheme=scheme)
        assert status == 401, (token, scheme, answer)
        assert wrong not in json.dumps(answer) and TOKEN not in json.dumps(answer)
    status, answer, _ = post(pool, OK_ITEM)
    assert status == 200 and answer["reward"] == 0.5, answer
    status, answer, _ = post(pool, OK_ITEM, scheme="bearer")  # the scheme is case-insensitive
    assert status == 200, answer


def test_a_body_over_the_limit_is_refused_413_before_it_is_read(pool: RewardPool) -> None:
    """Declared too big: 413 before a byte of the 30 MB body is sent. Chunked (no length): 413
    once the bytes that arrived pass the limit, while the client is still sending. Either
    way the endpoint then serves the next request."""
    declared = raw_request(
        pool,
        {
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/json",
            "Content-Length": str(30 * 2**20),
        },
    )
    status, answer = read_response(declared)
    declared.close()
    assert status == 413, answer
    assert f"reward.max_request_kb={LIMIT_KB} KiB" in answer["error"]

    chunked = raw_request(
        pool,
        {
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": "application/json",
            "Transfer-Encoding": "chunked",
        },
    )
    piece = b"x" * 16384
    sent = 0
    while sent < 30 * 2**20:
        if select.select([chunked], [], [], 0.05)[0]:  # the server answered: stop sending
            break
        try:
            chunked.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except (BrokenPipeError, ConnectionResetError):
            break
        sent += len(piece)
    status, answer = read_response(chunked)
    chunked.close()
    assert status == 413, answer
    assert f"reward.max_request_kb={LIMIT_KB} KiB" in answer["error"]
    assert sent < 30 * 2**20, "the client sent the whole body before the endpoint answered"

    status, answer, _ = post(pool, {"items": [OK_ITEM] * 3})
    assert status == 200 and [r["reward"] for r in answer["results"]] == [0.5] * 3


def test_too_many_items_are_refused_413(pool: RewardPool) -> None:
    status, answer, _ = post(pool, {"items": [OK_ITEM] * (MAX_HTTP_ITEMS + 1)})
    assert status == 413, answer
    assert f"at most {MAX_HTTP_ITEMS}" in answer["error"]


def test_errors_echo_at_most_200_characters_of_the_input(pool: RewardPool) -> None:
    long = "y" * 50_000
    for body in (
        {"response": long, "reference_answer": 3},
        {"items": long},
        b"not json " + long.encode(),
    ):
        status, answer, _ = post(pool, body)
        assert status == 400, answer
        assert len(answer["error"]) < 600 and "y" * 201 not in answer["error"], answer


def test_a_request_past_its_deadline_gets_504_and_does_not_hold_the_trainers_workers(
    pool: RewardPool,
) -> None:
    """A request whose scoring hangs and one whose body never arrives both get 504 at the
    deadline; meanwhile the trainer's path (the workers' handle) scores at once."""
    answers: dict[str, tuple[float, int, dict]] = {}

    def hanging() -> None:
        start = time.monotonic()
        status, answer, _ = post(pool, {"items": [{"response": "hang", "reference_answer": "1"},
                                                  OK_ITEM]})  # fmt: skip
        answers["hanging"] = (time.monotonic() - start, status, answer)

    def silent() -> None:
        start = time.monotonic()
        sock = raw_request(
            pool, {"Authorization": f"Bearer {TOKEN}", "Content-Length": "1000"}
        )  # promises a body it never sends
        status, answer = read_response(sock)
        sock.close()
        answers["silent"] = (time.monotonic() - start, status, answer)

    threads = [threading.Thread(target=f) for f in (hanging, silent)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # both requests are in the endpoint
    results = pool.score([ScoreRequest("fine", "1")] * 2)
    assert [r.reward for r in results] == [0.5, 0.5]
    assert all(t.is_alive() for t in threads), "the trainer's scoring waited for the HTTP requests"
    for t in threads:
        t.join(timeout=DEADLINE_S + GRACE_S + 60)
    for name in ("hanging", "silent"):
        elapsed, status, answer = answers[name]
        assert status == 504, (name, answer)
        assert f"reward.request_timeout_s={DEADLINE_S:g} s" in answer["error"]
        assert DEADLINE_S - 0.5 <= elapsed < DEADLINE_S + 30, (name, elapsed)
    status, answer, _ = post(pool, OK_ITEM)  # the endpoint serves the next request
    assert status == 200, answer


def test_the_proxy_is_bound_to_loopback_and_refuses_other_addresses(pool: RewardPool) -> None:
    """By default (reward.http_host=127.0.0.1) Serve's proxy listens on loopback only: a
    connection to this machine's outward address is refused."""
    ip = outward_ip()
    if ip is None:
        pytest.skip("this machine has no non-loopback IPv4 address")
    assert is_loopback(proxy_host())
    port = urlsplit(pool.url).port
    socket.create_connection(("127.0.0.1", port), timeout=10).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ip, port), timeout=10)
