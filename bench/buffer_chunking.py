"""How long one put holds Redis, unchunked and in chunks (issue #20, finding 11).

Redis runs one command at a time: while a put's script runs, every other client waits. The
store writes a put in chunks (``services.replay_buffer.store.PUT_CHUNK_GROUPS`` /
``PUT_CHUNK_BYTES``) so that no call holds Redis for more than ~50 ms. This puts
``--groups`` groups of one step into a private Redis (``BufferStore.put``, the groups
prepared by the server's own logic) once in one call and once in the default chunks, and
reports for each:

- ``max_call_ms``: the longest command Redis ran during the put (its SLOWLOG, server time);
- ``max_ping_ms``: the longest PING another client waited for meanwhile (client time);
- ``mb``: the put's StoredGroup and GroupSummary bytes;
- ``put_s``: the put's wall time; ``us_per_group``: the scripts' server time per group;
- ``calls``: the script calls of the put.

    python bench/buffer_chunking.py [--groups 50000] [--n 8] [--tokens 6]

Prints one JSON line per mode.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from buffer import SPECS, make_groups  # noqa: E402  (bench/buffer.py, beside this file)

from services.embedded_redis import EmbeddedRedis, redis_client  # noqa: E402
from services.replay_buffer import logic  # noqa: E402
from services.replay_buffer.store import BufferStore  # noqa: E402
from shuffle_r1.config import AlgorithmConfig  # noqa: E402


def measure(url: str, spec: bytes, records: list, unchunked: bool) -> dict[str, float]:
    options = {"chunk_groups": 10**9, "chunk_bytes": 2**62} if unchunked else {}
    store = BufferStore(url, keep_steps=4, max_staleness=0, timeout_s=120, **options)
    admin = redis_client(url)
    admin.config_set("slowlog-log-slower-than", 0)
    admin.config_set("slowlog-max-len", 100_000)
    admin.slowlog_reset()
    pings: list[float] = []
    done = threading.Event()

    def ping() -> None:
        client = redis_client(url)
        while not done.is_set():
            start = time.perf_counter()
            client.ping()
            pings.append(time.perf_counter() - start)
            time.sleep(0.001)
        client.close()

    pinger = threading.Thread(target=ping)
    pinger.start()
    time.sleep(0.05)
    start = time.perf_counter()
    store.put("bench", spec, records)
    put_s = time.perf_counter() - start
    done.set()
    pinger.join()
    log = admin.slowlog_get(100_000)
    scripts = [e for e in log if e["command"].startswith((b"EVALSHA", b"EVAL "))]
    admin.slowlog_reset()
    admin.flushall()
    admin.close()
    store.close()
    return {
        "mode": "one call" if unchunked else "chunked",
        "groups": len(records),
        "mb": round(sum(len(r.payload) + len(r.summary) for r in records) / 2**20, 1),
        "calls": len(scripts),
        "max_call_ms": round(max(e["duration"] for e in log) / 1000, 1),
        "max_ping_ms": round(max(pings) * 1000, 1),
        "put_s": round(put_s, 2),
        "us_per_group": round(sum(e["duration"] for e in scripts) / len(records), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=int, default=50_000)
    parser.add_argument("--n", type=int, default=8, help="rollouts per group")
    parser.add_argument("--tokens", type=int, default=6, help="prompt and response tokens")
    args = parser.parse_args()
    groups = make_groups(
        "bench", 0, args.groups, random.Random(0),
        group_size=args.n, prompt_tokens=args.tokens, response_tokens=args.tokens,
    )  # fmt: skip
    # with log-probs, as this was measured (store.PUT_CHUNK_BYTES)
    spec = logic.resolve_spec(SPECS["with_logprobs"], AlgorithmConfig(), "bench")
    records = logic.prepare_groups(groups, spec)
    with EmbeddedRedis() as private:
        for unchunked in (True, False):
            print(
                json.dumps(measure(private.url, spec.SerializeToString(), records, unchunked)),
                flush=True,
            )


if __name__ == "__main__":
    main()
