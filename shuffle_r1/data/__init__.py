"""Prompt data: reading datasets, their images, the prompt template and the resumable
prompt sampler."""

from shuffle_r1.data.dataset import Example, LoadResult, SkippedRow, load_examples
from shuffle_r1.data.images import ImageError, ImageSpec, decode_images, vision_inputs
from shuffle_r1.data.prompt import (
    DEFAULT_TEMPLATE,
    INSTRUCTION,
    PromptTemplate,
    build_messages,
    load_prompt_template,
    render_prompt,
)
from shuffle_r1.data.sampler import PromptSampler

__all__ = [
    "DEFAULT_TEMPLATE",
    "INSTRUCTION",
    "Example",
    "ImageError",
    "ImageSpec",
    "LoadResult",
    "PromptSampler",
    "PromptTemplate",
    "SkippedRow",
    "build_messages",
    "decode_images",
    "load_examples",
    "load_prompt_template",
    "render_prompt",
    "vision_inputs",
]
