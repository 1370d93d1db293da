"""The run's prompts: every example of the train and validation files rendered with the
chat template, tokenised and checked against ``data.max_prompt_length``, with its images
prepared (``shuffle_r1.data.images``). The trainer samples from these; the benchmarks and
tests load them the same way."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shuffle_r1.config import DataConfig
from shuffle_r1.data.dataset import Example, LoadResult, load_examples
from shuffle_r1.data.images import ImageSpec, expand_image_tokens
from shuffle_r1.data.prompt import PromptTemplate, chat_prompt, load_prompt_template

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """A dataset example with its rendered, tokenised prompt and its prepared images
    (``shuffle_r1.data.images``: PNG bytes, their tokens expanded in ``token_ids``); ``text``
    is the user turn's text that ``data.prompt_template`` rendered (before the chat template),
    which record-taking reward functions receive."""

    example: Example
    token_ids: list[int]
    images: tuple[bytes, ...] = ()
    text: str = ""


def tokenize_prompts(
    tokenizer: Any,
    examples: list[Example],
    max_len: int,
    policy: str,
    processor: Any = None,
    template: PromptTemplate | None = None,
) -> tuple[list[Prompt], int]:
    """Render and tokenise every example; returns the prompts and how many were over
    ``max_len`` tokens. ``policy``: ``skip`` drops those, ``truncate`` keeps their last
    ``max_len`` tokens (the end of the problem and the generation prompt), ``error`` raises
    ``ValueError`` naming the first one.

    ``template`` renders each user text (``None``: the default,
    :func:`~shuffle_r1.data.prompt.load_prompt_template`); a row it cannot render raises
    ``ValueError`` naming the row and the variable.
    ``processor`` (a vision-language model's, ``shuffle_r1.processor``) renders the chat
    template, and each image placeholder is expanded to its image's tokens
    (``shuffle_r1.data.images.expand_image_tokens``; the example's images are prepared bytes,
    not resized again). A prompt with images is truncated only when every image token
    survives the cut; otherwise it is skipped. Raises ``ValueError`` for an example with
    images but no processor, or whose placeholders and images differ in number.
    """
    prompts, overlong = [], 0
    template = template or load_prompt_template("")
    for ex in examples:
        user_text = template.render(ex)
        try:
            text = chat_prompt(processor or tokenizer, user_text, len(ex.images))
        except ValueError as exc:  # the template's image marks do not match the images
            raise ValueError(f"prompt {ex.uid!r}: {exc}") from exc
        image_token = -1
        images = tuple(image for image in ex.images if isinstance(image, bytes))
        if ex.images:
            if processor is None:
                raise ValueError(f"prompt {ex.uid!r} has images but the model has no processor")
            if len(images) != len(ex.images):
                raise ValueError(
                    f"prompt {ex.uid!r} has an image given as a path; load the data with an "
                    "image_spec so that every image is prepared bytes"
                )
            image_token = processor.image_token_id
            try:
                text = expand_image_tokens(
                    text, images, processor.image_processor, processor.image_token
                )
            except ValueError as exc:
                raise ValueError(f"prompt {ex.uid!r}: {exc}") from exc
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_len:
            overlong += 1
            if policy == "error":
                raise ValueError(
                    f"prompt {ex.uid!r} has {len(ids)} tokens, over data.max_prompt_length="
                    f"{max_len}; set data.overlong_prompt=skip or truncate"
                )
            if policy == "skip" or ids[-max_len:].count(image_token) != ids.count(image_token):
                continue
            ids = ids[-max_len:]
        prompts.append(Prompt(ex, list(ids), images, user_text))
    return prompts, overlong


def load_data_file(
    d: DataConfig, path: str, limit: int | None, image_spec: ImageSpec | None = None
) -> LoadResult:
    """:func:`~shuffle_r1.data.dataset.load_examples` of ``path`` with the columns, answer
    format and image root ``d`` configures; at most ``limit`` examples (``None``: all)."""
    return load_examples(
        path,
        problem_key=d.problem_key,
        answer_key=d.answer_key,
        image_key=d.image_key,
        id_key=d.id_key or None,
        answer_format=d.answer_format,
        image_root=d.image_root or None,
        image_spec=image_spec,
        limit=limit,
    )


def load_prompt_splits(
    d: DataConfig, tokenizer: Any, processor: Any = None, model: str | Path = "the model"
) -> tuple[list[Prompt], list[Prompt], int, int]:
    """The train and validation prompts of ``d`` (the first ``d.train_size`` / ``d.val_size``
    examples of each file, 0 = all; read, rendered, tokenised), with the rows skipped and the
    prompts over ``d.max_prompt_length``, over both files. The trainer's sampler indexes the
    train list.

    With a vision-language ``processor``, every image is decoded, resized
    (``d.min_pixels``..``d.max_pixels``) and encoded here; a row whose image cannot be used is
    skipped and counted (the first five are logged with file, row and why).

    Raises:
        ValueError: a file yields no usable prompt, or it has images and ``processor`` is None
            (``model`` is text-only); ``d.prompt_template`` does not load or render a row.
    """
    spec = None
    if processor is not None:
        ip = processor.image_processor
        spec = ImageSpec(d.min_pixels, d.max_pixels, ip.patch_size * ip.merge_size)
    template = load_prompt_template(d.prompt_template)
    out, skipped, overlong = [], 0, 0
    for path, size in ((d.train_path, d.train_size), (d.val_path, d.val_size)):
        result = load_data_file(d, path, size or None, spec)
        for row in result.skipped[:5]:
            logger.warning("skipped %s", row)
        with_images = sum(bool(ex.images) for ex in result.examples)
        if with_images and processor is None:
            raise ValueError(
                f"{path}: {with_images} rows have images (data.image_key={d.image_key!r}) but "
                f"{model} is a text-only model; use a vision-language model, or set "
                "data.image_key='' to train on the text alone"
            )
        prompts, over = tokenize_prompts(
            tokenizer,
            list(result.examples),
            d.max_prompt_length,
            d.overlong_prompt,
            processor,
            template,
        )
        skipped += len(result.skipped)
        overlong += over
        if not prompts:
            raise ValueError(f"{path}: no usable prompt (all rows skipped or overlong)")
        out.append(prompts)
    train, val = out
    logger.info("data: %d train prompts, %d validation prompts", len(train), len(val))
    return train, val, skipped, overlong
