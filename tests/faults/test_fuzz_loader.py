"""Fuzzing the dataset loader (issue #8): random bytes and random JSON / Parquet content as
.jsonl, .json and .parquet files. ``load_examples`` either raises one of its documented
whole-file errors (FileNotFoundError, or ValueError naming the file) or returns a
LoadResult in which every row is an Example or a SkippedRow and the counts add up; never
another exception. Prompts over ``data.max_prompt_length`` are skipped, truncated or
refused by ``data.overlong_prompt`` and counted (the trainer's ``tokenize_prompts``)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shuffle_r1.data import Example, LoadResult, load_examples
from shuffle_r1.data.dataset import SkippedRow

FUZZ = settings(max_examples=80, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the fuzzed files are written, with an image file ``pic.png`` rows may name."""
    path = tmp_path_factory.mktemp("fuzz-loader")
    (path / "pic.png").write_bytes(b"\x89PNG")
    return path


# Values a row's keys may hold: what JSON can express, with text and paths that stress the
# image lookup (NUL bytes, names too long for the file system, files that exist: pic.png
# next to the data file, an absolute path).
texts = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["pic.png", "/proc/self/status", "a\x00b", "x" * 300, "../" * 90, ""]),
    st.just("#### 1,000"),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=12,
)
rows = st.one_of(
    json_values,
    st.fixed_dictionaries({}, optional={"problem": json_values, "answer": json_values,
                                        "images": json_values, "id": json_values}),
    st.fixed_dictionaries({"problem": texts, "answer": st.one_of(texts, st.integers())},
                          optional={"images": st.lists(texts, max_size=2), "id": texts}),
)  # fmt: skip
# JSON that Python's parser refuses with other errors than JSONDecodeError
nasty_json = st.sampled_from(["[" * 100_000, "1" * 5000, '{"problem": ' + "[" * 50_000])
options = st.fixed_dictionaries(
    {"answer_format": st.sampled_from(["raw", "gsm8k"]), "id_key": st.sampled_from([None, "id"])}
)


def check(path: Path, rows_in_file: int | None, **kwargs: object) -> LoadResult | None:
    """Load ``path``; assert the loader's contract. ``rows_in_file``: the rows a reader must
    see (None: unknown, the file may be damaged). Returns the result, None if it raised."""
    try:
        result = load_examples(path, **kwargs)  # type: ignore[arg-type]
    except (FileNotFoundError, ValueError) as exc:
        assert str(path) in str(exc), f"the error does not name the file: {exc!r}"
        assert type(exc) in (FileNotFoundError, ValueError), type(exc)
        return None
    assert all(type(e) is Example for e in result.examples)
    assert all(type(s) is SkippedRow for s in result.skipped)
    total = len(result.examples) + len(result.skipped)
    if rows_in_file is not None:
        assert total == rows_in_file
    numbers = [s.row for s in result.skipped]
    assert len(set(numbers)) == len(numbers) and all(n >= 1 for n in numbers)
    assert all(s.path == str(path) and s.reason for s in result.skipped)
    for e in result.examples:
        assert e.problem.strip() and e.answer and isinstance(e.uid, str)
        assert all(isinstance(i, bytes | str) and i for i in e.images)
    return result


def jsonl_rows(data: bytes) -> int:
    """Rows of a JSONL file: lines that are not blank (a line that is not UTF-8 is a row)."""
    count = 0
    for line in data.splitlines(keepends=True) if b"\r" not in data else data.split(b"\n"):
        try:
            count += bool(line.decode("utf-8").strip())
        except UnicodeDecodeError:
            count += 1
    return count


@FUZZ
@given(data=st.binary(max_size=300), suffix=st.sampled_from([".jsonl", ".json", ".parquet"]))
def test_random_bytes(folder, data, suffix):
    path = folder / f"random{suffix}"
    path.write_bytes(data)
    check(path, jsonl_rows(data) if suffix == ".jsonl" else None)


@FUZZ
@given(lines=st.lists(st.one_of(rows.map(json.dumps), st.text(max_size=30), nasty_json),
                     max_size=8), opts=options)  # fmt: skip
def test_jsonl_of_random_rows(folder, lines, opts):
    path = folder / "rows.jsonl"
    data = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8", "surrogatepass")
    path.write_bytes(data)
    check(path, jsonl_rows(data), **opts)


@FUZZ
@given(value=st.one_of(st.lists(rows, max_size=8), json_values), opts=options)
def test_json_of_random_values(folder, value, opts):
    path = folder / "rows.json"
    path.write_text(json.dumps(value))
    result = check(path, len(value) if isinstance(value, list) else None, **opts)
    assert (result is not None) == isinstance(value, list)  # anything but a list is refused


@given(text=nasty_json)
@settings(max_examples=3, deadline=None, database=None)
def test_json_the_parser_chokes_on(folder, text):
    path = folder / "nasty.json"
    path.write_text(text)
    assert check(path, None) is None


parquet_rows = st.lists(
    st.fixed_dictionaries({
        "problem": st.one_of(st.none(), texts),
        "answer": st.one_of(st.none(), texts),
        "images": st.one_of(st.none(), st.lists(
            st.fixed_dictionaries({"bytes": st.one_of(st.none(), st.binary(max_size=8)),
                                   "path": st.one_of(st.none(), texts)}), max_size=2)),
    }),
    max_size=8,
)  # fmt: skip


def parquet_bytes(records: list[dict[str, object]]) -> bytes:
    schema = pa.schema([("problem", pa.string()), ("answer", pa.string()),
                        ("images", pa.list_(pa.struct([("bytes", pa.binary()),
                                                       ("path", pa.string())])))])  # fmt: skip
    sink = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records, schema=schema), sink, row_group_size=3)
    return sink.getvalue()


@FUZZ
@given(records=parquet_rows, opts=options)
def test_parquet_of_random_rows(folder, records, opts):
    path = folder / "rows.parquet"
    path.write_bytes(parquet_bytes(records))
    check(path, len(records), **opts)


@FUZZ
@given(records=parquet_rows, data=st.data())
def test_damaged_parquet(folder, records, data):
    """A valid file cut short or with a byte changed: a ValueError naming the file, or the
    rows that could still be read (then each an Example or a SkippedRow)."""
    raw = bytearray(parquet_bytes(records))
    at = data.draw(st.integers(0, len(raw) - 1))
    if data.draw(st.booleans()):
        raw = raw[:at]
    else:
        raw[at] ^= data.draw(st.integers(1, 255))
    path = folder / "damaged.parquet"
    path.write_bytes(bytes(raw))
    check(path, None)


def test_whole_file_errors_name_the_file(tmp_path):
    for name, content in (("x.csv", b"a,b\n"), ("x.json", b"{}"), ("x.json", b"\xff")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=re.escape(str(tmp_path / name))):
            load_examples(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        load_examples(tmp_path / "missing.jsonl")


# ---- over-long prompts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def word_tokenizer():
    """A real transformers tokenizer: one token per word or run of punctuation, with a
    ChatML template, so a prompt's length can be counted independently with a regex."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return tok


def words(text: str) -> int:
    """Tokens of ``text`` under the Whitespace pre-tokenizer (its documented regex)."""
    return len(re.findall(r"\w+|[^\w\s]+", text))


@settings(max_examples=30, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=8), max_len=st.integers(40, 90))
def test_overlong_prompts_are_skipped_truncated_or_refused_and_counted(
    word_tokenizer, sizes, max_len
):
    from shuffle_r1.data import render_prompt
    from shuffle_r1.data.splits import tokenize_prompts

    examples = [Example(uid=f"q{i}", problem=" ".join(["two"] * k), answer="2")
                for i, k in enumerate(sizes)]  # fmt: skip
    lengths = [words(render_prompt(word_tokenizer, e)) for e in examples]
    over = [e.uid for e, n in zip(examples, lengths, strict=True) if n > max_len]

    kept, counted = tokenize_prompts(word_tokenizer, examples, max_len, "skip")
    assert counted == len(over)
    assert [p.example.uid for p in kept] == [e.uid for e in examples if e.uid not in over]
    assert all(len(p.token_ids) == n for p, n in zip(kept, [n for n in lengths if n <= max_len],
                                                      strict=True))  # fmt: skip

    truncated, counted = tokenize_prompts(word_tokenizer, examples, max_len, "truncate")
    assert counted == len(over) and len(truncated) == len(examples)
    for p, n in zip(truncated, lengths, strict=True):
        full = word_tokenizer(render_prompt(word_tokenizer, p.example),
                              add_special_tokens=False)["input_ids"]  # fmt: skip
        assert len(full) == n
        assert p.token_ids == full[-max_len:]  # the end: the problem and the generation prompt

    if over:
        with pytest.raises(ValueError, match=f"prompt '{over[0]}' has .* data.max_prompt_length"):
            tokenize_prompts(word_tokenizer, examples, max_len, "error")
    else:
        assert len(tokenize_prompts(word_tokenizer, examples, max_len, "error")[0]) == len(sizes)
