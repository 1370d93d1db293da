"""The prompt of the reference recipe (docs/algorithm.md §6).

The user turn holds, in this order: :data:`INSTRUCTION`, the image(s), the problem. The
model's chat template adds its own system message.

- Text-only example: the content is one string, ``INSTRUCTION + "\\n\\n" + problem``, which
  every chat template accepts (text-only templates such as SmolLM2's ChatML cannot render a
  content list).
- Example with images: the content is the transformers content list
  ``[{"type": "text", "text": INSTRUCTION}, {"type": "image"}, ..., {"type": "text", "text":
  problem}]`` with one image placeholder per image, in the order of ``Example.images``; the
  multimodal processor pairs the placeholders with the pixels. A literal ``<image>`` in the
  problem (Geometry3K writes one where its figure goes) is removed: the images have their
  place, and the text would otherwise carry a placeholder no processor expands.
"""

from __future__ import annotations

from typing import Any

from shuffle_r1.data.dataset import Example

IMAGE_MARK = "<image>"
INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide "
    "the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in \\boxed{}."
)


def build_messages(example: Example) -> list[dict[str, Any]]:
    """The chat messages for one example: a single user turn (see the module docstring)."""
    if not example.images:
        return [{"role": "user", "content": f"{INSTRUCTION}\n\n{example.problem}"}]
    content: list[dict[str, str]] = [{"type": "text", "text": INSTRUCTION}]
    content += [{"type": "image"} for _ in example.images]
    content.append({"type": "text", "text": example.problem.replace(IMAGE_MARK, "").strip()})
    return [{"role": "user", "content": content}]


def render_prompt(tokenizer: Any, example: Example) -> str:
    """The prompt text: the tokenizer's (or processor's) chat template applied to
    :func:`build_messages`, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(
        build_messages(example), add_generation_prompt=True, tokenize=False
    )
