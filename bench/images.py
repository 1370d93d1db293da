"""Multimodal data benchmark: preparing and tokenising K12's 500 image prompts.

For each pixel range — the CPU recipe's (56²..112², ``configs/k12_tiny_vl_cpu.yaml``) and the
paper's (512²..2048², docs/algorithm.md §7) — it loads ``data/k12/k12.json`` with an
:class:`~shuffle_r1.data.ImageSpec` (decode, RGB, resize onto the 28-pixel grid, PNG bytes),
then tokenises the prompts two ways with the tiny Qwen2.5-VL's processor (built into the model
cache if missing; the paper's Qwen2.5-VL uses the same image processor rules):

- ``expand_s``: what the trainer does — expand each ``<|image_pad|>`` from the image header
  (``shuffle_r1.data.images.expand_image_tokens``), then tokenise the text;
- ``processor_s``: transformers' ``processor(text, images)``, which also computes the pixel
  values (discarded at load time; the engines and the learner compute them again).

Both must give the same token ids (checked). Prints one JSON line per range: seconds, the
prepared PNG bytes (MiB), image tokens per prompt (min / median / max), prompt tokens, and
how many prompts exceed the paper's 2048-token prompt limit (``data.max_prompt_length``: the
trainer skips and counts them).
Run: ``.venv/bin/python bench/images.py``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shuffle_r1.data import ImageSpec, decode_images, load_examples, render_prompt  # noqa: E402
from shuffle_r1.data.images import expand_image_tokens  # noqa: E402
from shuffle_r1.models import TINY_QWEN2_5_VL, resolve_model_path  # noqa: E402
from shuffle_r1.processor import load_processor  # noqa: E402

RANGES = {"cpu_recipe": (56 * 56, 112 * 112), "paper": (512 * 512, 2048 * 2048)}


def main() -> None:
    processor = load_processor(resolve_model_path(TINY_QWEN2_5_VL))
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    for name, (low, high) in RANGES.items():
        start = time.perf_counter()
        examples = load_examples(
            ROOT / "data" / "k12" / "k12.json",
            problem_key="question",
            image_key="image_path",
            id_key="id",
            image_spec=ImageSpec(low, high),
        ).examples
        prepare_s = time.perf_counter() - start

        start = time.perf_counter()
        expanded = []
        for e in examples:
            images = [bytes(i) for i in e.images]
            text = expand_image_tokens(
                render_prompt(processor, e), images, image_processor, processor.image_token
            )
            expanded.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        expand_s = time.perf_counter() - start

        start = time.perf_counter()
        reference = [
            processor(
                text=[render_prompt(processor, e)],
                images=decode_images([bytes(i) for i in e.images]),
                do_resize=False,
                add_special_tokens=False,
            )["input_ids"][0]
            for e in examples
        ]
        processor_s = time.perf_counter() - start
        assert all(list(a) == list(b) for a, b in zip(expanded, reference, strict=True))

        image_tokens = sorted(ids.count(processor.image_token_id) for ids in expanded)
        lengths = sorted(len(ids) for ids in expanded)
        print(
            json.dumps(
                {
                    "range": name,
                    "min_pixels": low,
                    "max_pixels": high,
                    "prompts": len(examples),
                    "prepare_s": round(prepare_s, 2),
                    "expand_s": round(expand_s, 2),
                    "processor_s": round(processor_s, 2),
                    "png_mib": round(sum(len(e.images[0]) for e in examples) / 2**20, 1),
                    "image_tokens_min_median_max": [
                        image_tokens[0],
                        int(statistics.median(image_tokens)),
                        image_tokens[-1],
                    ],
                    "prompt_tokens_min_median_max": [
                        lengths[0],
                        int(statistics.median(lengths)),
                        lengths[-1],
                    ],
                    "prompts_over_2048_tokens": sum(n > 2048 for n in lengths),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
