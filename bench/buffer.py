"""Replay buffer benchmark: put/sample latency and throughput, and PTS+ABS compute time.

Two run configurations (``--configs``): ``trainer``, what the trainer puts (no rollout
log-probs: ``buffer.store_rollout_logprobs`` off, ``RunSpec.logprobs = LOGPROBS_OMITTED``;
token ids checked against a 151,936-token vocabulary, as ``RunSpec.vocab_size`` makes the
trainer's runs do), and ``with_logprobs``, the configuration this benchmark measured before
(a log-prob per response token put, checked, stored and sampled; token ids unchecked).

For each configuration and size B (trajectories in the *sampled* training batch: 128, 512,
2048), every step puts 2B rollouts (B/16·2 groups of n = 16, each rollout 512 response
tokens and 256 prompt tokens) in one PutGroups call; Shuffle-R1 with α = 0.5 keeps B of them
in B/2 pairs, and Sample returns a batch of B items (ABS, S = 8; fewer if a round falls
short). Each step is sampled ``--samples-per-step`` times by the server that took the put
("sample": the step's payloads are in that server's cache, the draw and the batch are
recomputed each time) and once by a second server on the same Redis ("sample_cold": the
payloads come from Redis, as after a restart).

The servers run as their own processes (``python -m services.replay_buffer.cli serve``)
on loopback, against the Redis at $SHUFFLE_R1_REDIS_URL or redis://127.0.0.1:6379/0 (an
embedded one if none answers), keep_steps = 2, so eviction runs as in training.

``--prompts by_group per_item`` measures both ways Sample can return the prompts: once per
group (``SampleRequest.prompts_by_group``, the trainer's way) and with every item (the only
way before #17 item 5).

Prints one JSON line per configuration, size and prompt layout. Times: wall clock at the client, ms.
``pts_abs_ms`` is the library's GRPO advantage + PTS + ABS on the step's rewards alone;
``prepare_ms`` and ``draw_ms`` are the server's put and sample logic (library calls plus
protobuf encoding) measured in this process. ``sample_server_mean_ms`` is the warm server's
own time per Sample (its ``shuffle_r1_buffer_request_seconds`` histogram: Redis, the draw, the
encoding; scraped from its metrics port before and after the measured steps), and
``sample_outside_server_mean_ms`` the rest of the client's mean wall time (gRPC on loopback,
the client's parse): where a Sample's time goes; ``sample_server_over_5ms_share`` and
``sample_client_over_5ms_share``, the share of samples over 5 ms as the server timed them and
as the client did: where the tail is.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protos import replay_buffer_pb2 as pb  # noqa: E402
from services.embedded_redis import EmbeddedRedis, ping  # noqa: E402
from services.replay_buffer import logic  # noqa: E402
from services.replay_buffer.client import ReplayBufferClient  # noqa: E402
from shuffle_r1.algos import (  # noqa: E402
    advantage_based_batch_shuffle,
    grpo_advantages,
    pairwise_trajectory_sampling,
)

GROUP_SIZE, RESPONSE_TOKENS, PROMPT_TOKENS = 16, 512, 256
VOCAB_SIZE = 151_936  # Qwen2.5's embedding rows; the random token ids are below 150,000
SPECS = {
    "trainer": pb.RunSpec(algorithm="shuffle_r1", keep_ratio=0.5, shuffle_times=8, seed=1,
                          vocab_size=VOCAB_SIZE, logprobs=pb.LOGPROBS_OMITTED),
    "with_logprobs": pb.RunSpec(algorithm="shuffle_r1", keep_ratio=0.5, shuffle_times=8, seed=1),
}  # fmt: skip


def make_groups(
    run_id: str,
    step: int,
    count: int,
    rng: random.Random,
    *,
    group_size: int = GROUP_SIZE,
    prompt_tokens: int = PROMPT_TOKENS,
    response_tokens: int = RESPONSE_TOKENS,
    logprobs: bool = True,
) -> list[pb.Group]:
    """``count`` random groups of one step (also ``buffer_chunking.py``'s), with a log-prob
    per response token if ``logprobs``."""
    return [
        pb.Group(
            run_id=run_id,
            step=step,
            prompt_id=f"prompt-{i:05d}",
            prompt_token_ids=[rng.randrange(150_000) for _ in range(prompt_tokens)],
            rollouts=[
                pb.Rollout(
                    token_ids=[rng.randrange(150_000) for _ in range(response_tokens)],
                    logprobs=[-rng.random() * 3 for _ in range(response_tokens)]
                    if logprobs
                    else [],
                    reward=rng.choice([0.0, 0.1, 0.9, 1.0]),
                    weight_version=step,
                    truncated=rng.random() < 0.1,
                )
                for _ in range(group_size)
            ],
        )
        for i in range(count)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_seconds(metrics_port: int, method: str) -> tuple[float, float, float]:
    """``(sum, count, count under 5 ms)`` of the server's request-time histogram for
    ``method``."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read()
    found = {"sum": 0.0, "count": 0.0}
    under_5ms = 0.0
    for line in text.decode().splitlines():
        for part in found:
            prefix = f'shuffle_r1_buffer_request_seconds_{part}{{method="{method}"}} '
            if line.startswith(prefix):
                found[part] = float(line[len(prefix) :])
        if (
            line.startswith("shuffle_r1_buffer_request_seconds_bucket{")
            and f'method="{method}"' in line
            and 'le="0.005"' in line
        ):
            under_5ms = float(line.rsplit(" ", 1)[1])
    return found["sum"], found["count"], under_5ms


def start_server(redis_url: str, metrics_port: int = 0) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "services.replay_buffer.cli", "serve", "--redis-url", redis_url,
         "--port", "0", "--keep-steps", "2", "--max-message-mb", "512",
         "--metrics-port", str(metrics_port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if select.select([process.stdout], [], [], 0.5)[0]:
            line = process.stdout.readline()  # type: ignore[union-attr]
            if line.startswith("replay buffer listening on "):
                return process, line.split()[-1]
        if process.poll() is not None:
            break
    process.kill()
    raise RuntimeError("the replay buffer server did not start")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def compute_times(groups: list[pb.Group], spec: pb.RunSpec, reps: int) -> dict[str, float]:
    """Median ms of the library's GRPO+PTS+ABS, and of the server's put/sample logic."""
    rewards = torch.tensor([[r.reward for r in g.rollouts] for g in groups], dtype=torch.float64)
    library, prepare, draw = [], [], []
    for rep in range(reps):
        start = time.perf_counter()
        selection = pairwise_trajectory_sampling(grpo_advantages(rewards), spec.keep_ratio)
        advantage_based_batch_shuffle(
            selection.weights.flatten(), spec.shuffle_times, torch.Generator().manual_seed(rep)
        )
        library.append(time.perf_counter() - start)
        start = time.perf_counter()
        records = logic.prepare_groups(groups, spec)
        prepare.append(time.perf_counter() - start)
        payloads = [r.payload for r in sorted(records, key=lambda r: r.prompt_id)]
        start = time.perf_counter()
        logic.draw_batch(payloads, spec, rep, collapse_tau=0.1)
        draw.append(time.perf_counter() - start)
    return {
        "pts_abs_ms": round(statistics.median(library) * 1e3, 3),
        "prepare_ms": round(statistics.median(prepare) * 1e3, 2),
        "draw_ms": round(statistics.median(draw) * 1e3, 3),
    }


def bench_size(
    client: ReplayBufferClient,
    cold: ReplayBufferClient,
    config: str,
    size: int,
    steps: int,
    samples_per_step: int,
    by_group: bool,
    metrics_port: int,
) -> dict:
    spec = SPECS[config]
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    count = 2 * size // GROUP_SIZE
    rng = random.Random(size)
    logprobs = spec.logprobs == pb.LOGPROBS_REQUIRED
    pool = [make_groups(run_id, 0, count, rng, logprobs=logprobs) for _ in range(3)]
    put_s, sample_s, cold_s, items, sample_bytes = [], [], [], [], 0
    try:
        for step in range(steps + 2):  # the first 2 steps warm up and are not counted
            groups = pool[step % len(pool)]
            for g in groups:
                g.step = step
                for r in g.rollouts:
                    r.weight_version = step
            start = time.perf_counter()
            put = client.put_groups(groups, spec=spec)
            elapsed = time.perf_counter() - start
            assert put.stored == count, put
            if step == 2:
                server_before = server_seconds(metrics_port, "Sample")
            for _ in range(samples_per_step):
                t0 = time.perf_counter()
                batch = client.sample(
                    run_id, step, policy_version=step, expected_groups=count,
                    prompts_by_group=by_group,
                )  # fmt: skip
                if step >= 2:
                    sample_s.append(time.perf_counter() - t0)
            if step == steps + 1:
                server_after = server_seconds(metrics_port, "Sample")
            t0 = time.perf_counter()
            cold.sample(
                run_id, step, policy_version=step, expected_groups=count,
                prompts_by_group=by_group,
            )  # fmt: skip
            if step >= 2:
                cold_s.append(time.perf_counter() - t0)
                put_s.append(elapsed)
                items.append(len(batch.items))
                sample_bytes = batch.ByteSize()
        result = {
            "config": config,
            "trajectories": size,
            "trajectories_put": count * GROUP_SIZE,
            "groups": count,
            "group_size": GROUP_SIZE,
            "response_tokens": RESPONSE_TOKENS,
            "prompt_tokens": PROMPT_TOKENS,
            "prompts_by_group": by_group,
            "items_sampled_mean": round(statistics.mean(items), 1),
            "sample_mb": round(sample_bytes / 2**20, 2),
            "put_p50_ms": round(percentile(put_s, 50) * 1e3, 2),
            "put_p99_ms": round(percentile(put_s, 99) * 1e3, 2),
            "put_trajectories_per_s": round(count * GROUP_SIZE / statistics.mean(put_s)),
            "sample_p50_ms": round(percentile(sample_s, 50) * 1e3, 2),
            "sample_p99_ms": round(percentile(sample_s, 99) * 1e3, 2),
            "sample_trajectories_per_s": round(statistics.mean(items) / statistics.mean(sample_s)),
            "sample_mean_ms": round(statistics.mean(sample_s) * 1e3, 2),
            "sample_cold_p50_ms": round(percentile(cold_s, 50) * 1e3, 2),
            "sample_cold_p99_ms": round(percentile(cold_s, 99) * 1e3, 2),
            "puts": len(put_s),
            "samples": len(sample_s),
            "samples_cold": len(cold_s),
        }
        server_sum = server_after[0] - server_before[0]
        server_count = server_after[1] - server_before[1]
        if server_count != len(sample_s):
            raise RuntimeError(
                f"the server counted {server_count} samples, the client {len(sample_s)}"
            )
        result["sample_server_mean_ms"] = round(server_sum / server_count * 1e3, 2)
        # the server's own share of samples over 5 ms (its histogram's bucket), against the
        # client's: a tail the server does not see is gRPC's or the client's
        over = 1 - (server_after[2] - server_before[2]) / server_count
        result["sample_server_over_5ms_share"] = round(over, 4)
        result["sample_client_over_5ms_share"] = round(
            sum(t > 0.005 for t in sample_s) / len(sample_s), 4
        )
        result["sample_outside_server_mean_ms"] = round(
            result["sample_mean_ms"] - result["sample_server_mean_ms"], 2
        )
        result |= compute_times(pool[0], spec, reps=20)
        return result
    finally:
        client.drop_run(run_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=list(SPECS), default=list(SPECS))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--steps", type=int, default=40, help="steps put per size")
    parser.add_argument("--samples-per-step", type=int, default=10)
    parser.add_argument(
        "--prompts",
        nargs="+",
        choices=["by_group", "per_item"],
        default=["by_group"],
        help="how Sample returns prompts: once per group (SampleRequest.prompts_by_group, "
        "as the trainer asks) or with every item (as before #17)",
    )
    args = parser.parse_args()
    url = os.environ.get("SHUFFLE_R1_REDIS_URL", "redis://127.0.0.1:6379/0")
    embedded = None if ping(url) else EmbeddedRedis().start()
    metrics_port = free_port()  # the warm server's (the first)
    servers = [start_server(embedded.url if embedded else url, port) for port in (metrics_port, 0)]
    try:
        client, cold = (
            ReplayBufferClient(address, timeout_s=120, max_message_mb=512) for _, address in servers
        )
        for config in args.configs:
            for size in args.sizes:
                for prompts in args.prompts:
                    steps = max(5, args.steps * 512 // max(size, 512))
                    result = bench_size(
                        client, cold, config, size, steps, args.samples_per_step,
                        by_group=prompts == "by_group", metrics_port=metrics_port,
                    )  # fmt: skip
                    result["load_average_1m"] = round(os.getloadavg()[0], 2)
                    print(json.dumps(result), flush=True)
        client.close()
        cold.close()
    finally:
        for process, _ in servers:
            process.terminate()
            process.wait(timeout=30)
        if embedded is not None:
            embedded.close()


if __name__ == "__main__":
    main()
