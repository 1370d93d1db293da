"""Generate the arithmetic task of the algorithm benchmark (``bench/algorithms.py``).

``add2``: "What is a + b?" with a, b two-digit numbers (10..99), the answer their sum.
SmolLM2-135M-Instruct, the embedded default's model, answers a fraction of these right,
so most groups of rollouts have reward variance (the task the benchmark needs: neither
all-wrong nor all-right groups). The split is by problem: no (a, b) pair is in both files.

Writes ``data/add2/{train,test}.jsonl`` (rows ``{"id", "question", "answer"}``);
deterministic for a given ``--seed``. The data is generated, not copied: it carries the
project's license (Apache-2.0).

    python data/make_arith.py [--train 2000] [--test 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "add2"


def problems(seed: int) -> list[tuple[int, int]]:
    """Every (a, b) with 10 <= a, b <= 99, in an order fixed by ``seed``."""
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(seed).shuffle(pairs)
    return pairs


def write(path: Path, pairs: list[tuple[int, int]], prefix: str) -> None:
    with path.open("w") as f:
        for i, (a, b) in enumerate(pairs):
            row = {
                "id": f"{prefix}-{i:05d}",
                "question": f"What is {a} + {b}?",
                "answer": str(a + b),
            }
            f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    pairs = problems(args.seed)
    if args.train + args.test > len(pairs):
        raise SystemExit(f"--train + --test must be at most {len(pairs)}")
    OUT.mkdir(exist_ok=True)
    write(OUT / "train.jsonl", pairs[: args.train], "add2-train")
    write(OUT / "test.jsonl", pairs[args.train : args.train + args.test], "add2-test")
    print(f"wrote {args.train} train and {args.test} test problems to {OUT}")


if __name__ == "__main__":
    main()
