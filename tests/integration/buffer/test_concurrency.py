"""Concurrent putters (with retries) and samplers: no group is lost or duplicated, and
every batch is well formed while puts are in flight."""

import random
import threading
from collections import Counter

import grpc
from buffer_helpers import make_group

from services.replay_buffer.client import ReplayBufferClient

PUTTERS, SAMPLERS, STEPS, GROUPS_PER_PUTTER_STEP = 4, 3, 3, 6


def test_concurrent_putters_and_samplers(buffer, run_id):
    errors: list[BaseException] = []
    done = threading.Event()
    expected: dict[int, set[str]] = {s: set() for s in range(STEPS)}
    for p in range(PUTTERS):
        for s in range(STEPS):
            expected[s] |= {f"w{p}-{i}" for i in range(GROUPS_PER_PUTTER_STEP)}
    rewards = [1, 0, 0, 1, 0.5, 0, 1, 0]

    def putter(p: int) -> None:
        rng = random.Random(p)
        client = ReplayBufferClient(buffer.address, timeout_s=10, retries=3)
        try:
            for s in range(STEPS):
                groups = [make_group(run_id, s, f"w{p}-{i}", rng.sample(rewards, 8))
                          for i in range(GROUPS_PER_PUTTER_STEP)]  # fmt: skip
                for start in range(0, len(groups), 2):  # small puts, each retried once
                    chunk = groups[start : start + 2]
                    client.put_groups(chunk)
                    client.put_groups(chunk)
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    def sampler(k: int) -> None:
        client = ReplayBufferClient(buffer.address, timeout_s=10, retries=3)
        try:
            rounds = 0
            while not done.is_set() or rounds < 3:
                rounds += 1
                for s in range(STEPS):
                    try:
                        batch = client.sample(run_id, s, policy_version=0)
                    except grpc.RpcError as exc:  # the step may hold no group yet
                        if exc.code() != grpc.StatusCode.NOT_FOUND:
                            raise
                        continue
                    assert {i.prompt_id for i in batch.items} <= expected[s]
                    for high, low in zip(batch.items[0::2], batch.items[1::2], strict=True):
                        assert (high.prompt_id, high.pair_index) == (low.prompt_id, low.pair_index)
                if rounds > 200:
                    break
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    putters = [threading.Thread(target=putter, args=(p,)) for p in range(PUTTERS)]
    samplers = [threading.Thread(target=sampler, args=(k,)) for k in range(SAMPLERS)]
    for t in putters + samplers:
        t.start()
    for t in putters:
        t.join(timeout=120)
    done.set()
    for t in samplers:
        t.join(timeout=120)
    assert not errors, errors

    stats = buffer.client.stats(run_id)
    total = PUTTERS * STEPS * GROUPS_PER_PUTTER_STEP
    assert stats.counters.groups_stored == total
    assert stats.counters.duplicates == total
    assert [(s.step, s.groups_stored) for s in stats.steps] == [
        (s, PUTTERS * GROUPS_PER_PUTTER_STEP) for s in range(STEPS)
    ]
    for s in range(STEPS):
        batch = buffer.client.sample(run_id, s, policy_version=0, expected_groups=len(expected[s]))
        assert batch.groups == len(expected[s])
        # every group contributes its 2 kept pairs to the P the draw was over, once
        assert batch.pairs_total == 2 * len(expected[s])
        assert max(Counter(i.pair_index for i in batch.items).values()) <= 2 * 8  # S rounds
