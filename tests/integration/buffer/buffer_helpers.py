"""Helpers of the replay buffer tests: groups with reproducible contents, key listing."""

from __future__ import annotations

import random
from collections.abc import Sequence

import redis

from protos import replay_buffer_pb2 as pb


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
