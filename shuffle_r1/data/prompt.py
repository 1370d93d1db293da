"""The prompt: the user turn's text rendered from a row by a Jinja template
(``data.prompt_template``), then the model's chat template.

The template sees the row's columns by name (``Example.columns``: all but the problem,
answer and image columns), ``problem`` (the problem column's text) and ``num_images``. It
runs in Jinja's sandbox with strict undefined variables: a name the row does not have fails
(``{{ hint | default('') }}`` for a column some rows lack). The default,
:data:`DEFAULT_TEMPLATE`, is the reference recipe's (docs/algorithm.md §6):
:data:`INSTRUCTION`, the image(s), the problem. The model's chat template adds its own
system message.

- Text-only example: the user content is the rendered string, which every chat template
  accepts (text-only templates such as SmolLM2's ChatML cannot render a content list); by
  default ``INSTRUCTION + "\\n\\n" + problem``.
- Example with images: ``problem`` has its literal ``<image>`` marks removed (Geometry3K writes
  one where its figure goes) and is stripped; the rendered text holds one ``<image>`` mark per
  image where the template puts it (or none: the images then go first). The content is the
  transformers content list of the text between the marks and one ``{"type": "image"}`` per
  mark, in the order of ``Example.images``; the multimodal processor pairs the placeholders
  with the pixels. By default: ``[INSTRUCTION, image, ..., problem]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shuffle_r1.data.dataset import Example

IMAGE_MARK = "<image>"
INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide "
    "the final answer. The reasoning process MUST BE enclosed within <think> </think> tags. "
    "The final answer MUST BE put in \\boxed{}."
)
DEFAULT_TEMPLATE = (
    INSTRUCTION
    + "{% if num_images %}{{ '<image>' * num_images }}{% else %}\n\n{% endif %}{{ problem }}"
)
TEMPLATE_KEY = "data.prompt_template"
FILE_PREFIX = "file:"  # data.prompt_template=file:path/to/prompt.jinja


@dataclass(frozen=True)
class PromptTemplate:
    """A compiled ``data.prompt_template`` (:func:`load_prompt_template`)."""

    source: str  # the Jinja text
    origin: str  # where it came from, for messages: the config key, or key=@file
    compiled: Any  # the jinja2.Template

    def render(self, example: Example) -> str:
        """The user turn's text for ``example`` (see the module docstring).

        Raises:
            ValueError: naming :data:`TEMPLATE_KEY`, the row and the variable, for a variable
                the row does not have (or another error the template raises).
        """
        import jinja2

        problem = example.problem
        if example.images:
            problem = problem.replace(IMAGE_MARK, "").strip()
        context = {**example.columns, "problem": problem, "num_images": len(example.images)}
        try:
            return str(self.compiled.render(context))
        except jinja2.TemplateError as exc:
            raise ValueError(
                f"{self.origin}: rendering row {example.uid!r} failed: {exc}; its variables "
                f"are {sorted(context)}"
            ) from exc


def load_prompt_template(value: str) -> PromptTemplate:
    """Compile ``data.prompt_template``: ``""`` is :data:`DEFAULT_TEMPLATE`, ``file:path``
    the UTF-8 file at ``path`` (relative to the working directory), anything else the Jinja
    text itself. Jinja's ``ImmutableSandboxedEnvironment`` (no attribute or method access that
    could reach Python internals), ``StrictUndefined``, no autoescaping.

    Raises:
        ValueError: naming :data:`TEMPLATE_KEY`, for a file that cannot be read or a syntax
            error (with its line).
    """
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    origin, source = TEMPLATE_KEY, value or DEFAULT_TEMPLATE
    if value.startswith(FILE_PREFIX):
        origin = f"{TEMPLATE_KEY}={value}"
        try:
            source = Path(value.removeprefix(FILE_PREFIX)).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{origin}: cannot read the template file: {exc}") from exc
    env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)
    try:
        compiled = env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"{origin}: line {exc.lineno}: {exc.message}") from exc
    return PromptTemplate(source, origin, compiled)


@functools.cache
def _default() -> PromptTemplate:
    return load_prompt_template("")


def messages_for(text: str, num_images: int) -> list[dict[str, Any]]:
    """The chat messages for a rendered user text: one user turn (see the module docstring).

    Raises:
        ValueError: ``text`` has ``<image>`` marks, but not ``num_images`` of them.
    """
    if not num_images:
        return [{"role": "user", "content": text}]
    parts = text.split(IMAGE_MARK)
    marks = len(parts) - 1
    if marks not in (0, num_images):
        raise ValueError(
            f"the rendered prompt has {marks} {IMAGE_MARK} marks for {num_images} images; "
            f"{TEMPLATE_KEY} must place one per image, or none"
        )
    content: list[dict[str, str]] = []
    if not marks:
        content += [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": text})
    else:
        for i, part in enumerate(parts):
            if i:
                content.append({"type": "image"})
            if part:
                content.append({"type": "text", "text": part})
    return [{"role": "user", "content": content}]


def build_messages(
    example: Example, template: PromptTemplate | None = None
) -> list[dict[str, Any]]:
    """The chat messages for one example, its user text rendered by ``template`` (``None``:
    :data:`DEFAULT_TEMPLATE`)."""
    text = (template or _default()).render(example)
    return messages_for(text, len(example.images))


def chat_prompt(tokenizer: Any, text: str, num_images: int) -> str:
    """The prompt text: the tokenizer's (or processor's) chat template applied to
    :func:`messages_for`, ending with the assistant's generation prompt."""
    return tokenizer.apply_chat_template(
        messages_for(text, num_images), add_generation_prompt=True, tokenize=False
    )


def render_prompt(tokenizer: Any, example: Example, template: PromptTemplate | None = None) -> str:
    """:func:`chat_prompt` of ``example``'s user text rendered by ``template`` (``None``:
    :data:`DEFAULT_TEMPLATE`)."""
    text = (template or _default()).render(example)
    return chat_prompt(tokenizer, text, len(example.images))
