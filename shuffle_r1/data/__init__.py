"""Prompt data: reading datasets, the prompt template and the resumable prompt sampler."""

from shuffle_r1.data.dataset import Example, LoadResult, SkippedRow, load_examples
from shuffle_r1.data.prompt import INSTRUCTION, build_messages, render_prompt
from shuffle_r1.data.sampler import PromptSampler

__all__ = [
    "INSTRUCTION",
    "Example",
    "LoadResult",
    "PromptSampler",
    "SkippedRow",
    "build_messages",
    "load_examples",
    "render_prompt",
]
