"""What the sampled batch costs the driver (issue #18, item 7): the trainer receives the
buffer's ``SampleResponse`` over gRPC, turns it into a ``TrainBatch``
(``services.trainer.records.train_batch``) and sends each learner rank its rows as a Ray
task argument (serialised once per rank). This times those three driver-side steps on a
synthetic batch, in-process (no gRPC, no Ray: the bytes a real run moves, without the
transport), at the main job's size and at the paper's (512 prompts x 16 rollouts, PTS
keeping half, ~1k-token responses), so the cost of the batch passing through the driver
can be set against a step.

    python bench/driver_batch.py [--repeats 5]

Prints one JSON line per size: items, tokens, response bytes, and the median seconds of
``parse`` (protobuf from bytes), ``train_batch`` and ``ship`` (pickling each rank's rows,
as Ray serialises a task argument), and their sum.
"""

from __future__ import annotations

import argparse
import pickle
import random
import statistics
import time

from common import emit

# (name, sampled items, prompt tokens, response tokens, ranks)
SIZES = (
    ("main job (8 prompts x 8, alpha 0.5)", 32, 88, 24, 2),
    ("paper (512 prompts x 16, alpha 0.5)", 4096, 300, 1024, 8),
)


def sample_response(items: int, prompt_tokens: int, response_tokens: int) -> bytes:
    """A serialised ``SampleResponse`` of ``items`` items, pairs adjacent, as the buffer
    answers (random token ids below SmolLM2's vocabulary)."""
    from protos import replay_buffer_pb2 as pb

    rng = random.Random(0)
    response = pb.SampleResponse(groups=items // 16 or 1, pairs_total=items // 2)
    for i in range(items):
        response.items.add(
            step=0,
            prompt_id=f"p{i // 8:05d}",
            prompt_token_ids=[rng.randrange(49152) for _ in range(prompt_tokens)],
            rollout=pb.Rollout(
                token_ids=[rng.randrange(49152) for _ in range(response_tokens)], reward=1.0
            ),
            advantage=rng.uniform(-1, 1),
            pair_index=i // 2,
        )
    return response.SerializeToString()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()

    from protos import replay_buffer_pb2 as pb
    from services.trainer.records import train_batch
    from shuffle_r1.minibatches import pair_aligned_shards

    for name, items, prompt_tokens, response_tokens, ranks in SIZES:
        raw = sample_response(items, prompt_tokens, response_tokens)
        times: dict[str, list[float]] = {"parse": [], "train_batch": [], "ship": []}
        for _ in range(args.repeats):
            t = time.perf_counter()
            sample = pb.SampleResponse.FromString(raw)
            times["parse"].append(time.perf_counter() - t)
            t = time.perf_counter()
            batch, _ = train_batch(sample)
            times["train_batch"].append(time.perf_counter() - t)
            t = time.perf_counter()
            shipped = sum(
                len(pickle.dumps(batch.select(s), protocol=5))
                for s in pair_aligned_shards(len(batch), ranks)
            )
            times["ship"].append(time.perf_counter() - t)
        median = {k: statistics.median(v) for k, v in times.items()}
        emit(
            {
                "bench": "driver_batch",
                "size": name,
                "items": items,
                "tokens": items * (prompt_tokens + response_tokens),
                "sample_bytes": len(raw),
                "shipped_bytes": shipped,
                "ranks": ranks,
                "seconds": median,
                "total_s": sum(median.values()),
            }
        )


if __name__ == "__main__":
    main()
