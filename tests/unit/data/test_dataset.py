"""Reading datasets: real GSM8K, JSON/Parquet round trips, malformed rows, image references."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shuffle_r1.data import Example, ImageSpec, SkippedRow, decode_images, load_examples
from shuffle_r1.rewards import math_reward

DATA = Path(__file__).resolve().parents[3] / "data"
K12 = DATA / "k12" / "k12.json"
NUMBER = re.compile(r"-?\d+(\.\d+)?")


@pytest.mark.parametrize(("split", "rows"), [("train", 7473), ("test", 1319)])
def test_gsm8k_loads_every_row_with_a_numeric_answer(split: str, rows: int) -> None:
    result = load_examples(
        DATA / "gsm8k" / f"{split}.jsonl", problem_key="question", answer_format="gsm8k"
    )
    assert result.skipped == []
    assert len(result.examples) == rows
    assert all(NUMBER.fullmatch(e.answer) for e in result.examples)
    assert len({e.uid for e in result.examples}) == rows
    assert all(e.images == () and e.problem.strip() for e in result.examples)


def test_gsm8k_first_test_rows() -> None:
    examples = load_examples(
        DATA / "gsm8k" / "test.jsonl", problem_key="question", answer_format="gsm8k"
    ).examples
    assert examples[0].uid == "test-1"
    assert examples[0].problem.startswith("Janet’s ducks lay 16 eggs per day.")
    assert [e.answer for e in examples[:3]] == ["18", "3", "70000"]  # "#### 70000"


def test_gsm8k_raw_answer_keeps_the_solution() -> None:
    example = load_examples(DATA / "gsm8k" / "test.jsonl", problem_key="question").examples[0]
    assert example.answer.endswith("#### 18") and "<<16-3-4=9>>" in example.answer


def test_gsm8k_thousands_separator_removed(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "work\n#### 1,234,567 "}) + "\n")
    result = load_examples(path, problem_key="question", answer_format="gsm8k")
    assert result.examples[0].answer == "1234567"


EXAMPLES = [  # the id column is one of the row's other columns (Example.columns)
    Example(uid="a", problem="What is 1+1?", answer="2", columns={"id": "a"}),
    Example(uid="b", problem="Solve $x^2=4$, x>0.", answer="$2$", columns={"id": "b"}),
    Example(uid="c", problem="Ünïcödé ∑", answer="\\frac{1}{2}", columns={"id": "c"}),
]


def _records() -> list[dict[str, str]]:
    return [{"id": e.uid, "problem": e.problem, "answer": e.answer} for e in EXAMPLES]


def test_json_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(_records(), ensure_ascii=False), encoding="utf-8")
    assert load_examples(path, id_key="id").examples == EXAMPLES


def test_jsonl_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()) + "\n\n")
    result = load_examples(path, id_key="id")
    assert result.examples == EXAMPLES and result.skipped == []


def test_parquet_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(_records()), path, row_group_size=2)  # 2 batches
    assert load_examples(path, id_key="id").examples == EXAMPLES


def test_parquet_with_image_bytes_and_numeric_answers(tmp_path: Path) -> None:
    # Hugging Face datasets stores images as {"bytes": ..., "path": ...}.
    rows = [
        {"problem": "p0", "answer": 3, "images": [{"bytes": b"\x89PNG0", "path": None}]},
        {"problem": "p1", "answer": 4, "images": [{"bytes": b"\x89PNG1", "path": "x.png"}]},
    ]
    path = tmp_path / "mm.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    result = load_examples(path)
    assert [(e.uid, e.answer, e.images) for e in result.examples] == [
        ("mm-1", "3", (b"\x89PNG0",)),
        ("mm-2", "4", (b"\x89PNG1",)),
    ]


def test_malformed_jsonl_rows_are_skipped_with_line_numbers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = [
        json.dumps({"problem": "ok 1", "answer": "1"}),  # 1
        '{"problem": "broken", "answer": ',  # 2
        json.dumps({"problem": "no answer"}),  # 3
        json.dumps({"problem": "list answer", "answer": [1]}),  # 4
        json.dumps({"problem": "   ", "answer": "1"}),  # 5
        "",  # 6: blank, not a row
        json.dumps(["not", "an", "object"]),  # 7
        json.dumps({"problem": 5, "answer": "1"}),  # 8
        json.dumps({"problem": "bool answer", "answer": True}),  # 9
        json.dumps({"problem": "ok 2", "answer": 2.5}),  # 10
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe not utf-8\n")  # 11
    with caplog.at_level(logging.WARNING, logger="shuffle_r1.data.dataset"):
        result = load_examples(path)
    assert [(e.uid, e.problem, e.answer) for e in result.examples] == [
        ("bad-1", "ok 1", "1"),
        ("bad-10", "ok 2", "2.5"),
    ]
    reasons = {s.row: s.reason for s in result.skipped}
    assert sorted(reasons) == [2, 3, 4, 5, 7, 8, 9, 11]
    assert all(s.path == str(path) for s in result.skipped)
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3].startswith("missing key 'answer'")
    assert reasons[4] == "'answer' must be a string or a number, got list"
    assert reasons[5] == "empty 'problem'"
    assert reasons[7] == "expected an object, got list"
    assert reasons[8] == "'problem' must be a string, got int"
    assert reasons[9] == "'answer' must be a string or a number, got bool"
    assert reasons[11].startswith("not UTF-8")
    assert str(result.skipped[0]) == f"{path} line 2: {reasons[2]}"
    assert "skipped 8 rows" in caplog.text


def test_gsm8k_format_without_marker_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "g.json"
    path.write_text(json.dumps([{"question": "q", "answer": "no marker"}]))
    result = load_examples(path, problem_key="question", answer_format="gsm8k")
    assert result.examples == []
    assert result.skipped == [
        SkippedRow(str(path), 1, "'answer' has no '####' (answer_format='gsm8k')")
    ]


def test_duplicate_ids_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    rows = [{"id": 7, "problem": "p", "answer": "1"}, {"id": 7, "problem": "q", "answer": "2"}]
    path.write_text(json.dumps(rows))
    result = load_examples(path, id_key="id")
    assert [e.uid for e in result.examples] == ["7"]
    assert (
        result.skipped[0].row == 2
        and "duplicate id '7' (first at row 1)" in result.skipped[0].reason
    )


def test_ids_too_long_for_the_buffer_are_skipped(tmp_path: Path) -> None:
    """Issue #20 finding 10: an id over MAX_PROMPT_ID_BYTES was refused by the buffer at the
    first put, minutes into the run; it is a malformed row, skipped here with file and row."""
    path = tmp_path / "ids.jsonl"
    ids = ["a" * 512, "b" * 513, "\N{GREEK SMALL LETTER BETA}" * 257, "\ud800", 10**600 // 10**590]
    path.write_text(
        "".join(json.dumps({"id": i, "problem": "p", "answer": "1"}) + "\n" for i in ids)
    )
    result = load_examples(path, id_key="id")
    assert [e.uid for e in result.examples] == ["a" * 512, str(10**10)]
    skipped = {s.row: str(s) for s in result.skipped}
    assert sorted(skipped) == [2, 3, 4]
    assert skipped[2].startswith(f"{path} line 2: 'id' 'bbbbbbbb")
    assert "is 513 bytes of UTF-8; the replay buffer takes ids of at most 512" in skipped[2]
    assert "... (515 chars)" in skipped[2]  # the id itself is not echoed whole
    assert "is 514 bytes of UTF-8" in skipped[3]  # β is 2 bytes: 257 characters, 514 bytes
    assert "'id' '\\ud800' is not valid Unicode" in skipped[4]


def test_images_resolved_against_the_file_folder_or_image_root(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "images" / name).write_bytes(b"png")
    rows = [
        {"problem": "one", "answer": "1", "image": "images/a.png"},
        {"problem": "two", "answer": "2", "image": ["images/a.png", "images/b.png"]},
        {"problem": "none", "answer": "3"},
        {"problem": "missing", "answer": "4", "image": ["images/a.png", "images/zzz.png"]},
        {"problem": "absolute", "answer": "5", "image": str(tmp_path / "images" / "b.png")},
        {"problem": "bad type", "answer": "6", "image": 17},
    ]
    sub = tmp_path / "split"
    sub.mkdir()
    path = sub / "rows.json"
    path.write_text(json.dumps(rows))

    result = load_examples(path, image_key="image", image_root=tmp_path)
    a, b = str(tmp_path / "images" / "a.png"), str(tmp_path / "images" / "b.png")
    assert [e.images for e in result.examples] == [(a,), (a, b), (), (b,)]
    assert [(s.row, s.reason) for s in result.skipped] == [
        (4, f"image file not found: {tmp_path / 'images' / 'zzz.png'}"),
        (6, "'image' must hold a path, bytes or a list of them, got int"),
    ]
    # Without image_root, relative paths are resolved against split/, where they do not exist.
    default_root = load_examples(path, image_key="image")
    assert [e.problem for e in default_root.examples] == ["none", "absolute"]


def test_real_k12_rows_with_images() -> None:
    result = load_examples(K12, problem_key="question", image_key="image_path", id_key="id")
    assert result.skipped == [] and len(result.examples) == 500
    assert all(len(e.images) == 1 and Path(str(e.images[0])).is_file() for e in result.examples)
    assert result.examples[0].answer == "$2\\sin (2x-\\frac{\\pi }{6})$"


@pytest.mark.slow
def test_all_500_k12_rows_load_with_decoded_images_and_verifiable_answers() -> None:
    """The data/k12 copy through the multimodal pipeline: every row loads, every image
    decodes into an RGB PNG on the vision grid, and the reward recognises each reference
    answer (boxed, it scores accuracy 1; a wrong number scores 0)."""
    spec = ImageSpec(min_pixels=56 * 56, max_pixels=112 * 112)
    result = load_examples(
        K12, problem_key="question", image_key="image_path", id_key="id", image_spec=spec
    )
    assert result.skipped == [] and len(result.examples) == 500
    assert len({e.uid for e in result.examples}) == 500
    for e in result.examples:
        (image,) = decode_images([bytes(e.images[0])])
        assert image.mode == "RGB" and spec.min_pixels <= image.width * image.height
    boxed = [
        math_reward(f"<think>work</think> so \\boxed{{{e.answer}}}.", e.answer)
        for e in result.examples
    ]
    failing = [
        (e.uid, e.answer) for e, r in zip(result.examples, boxed, strict=True) if r.accuracy != 1.0
    ]
    assert failing == [], (
        f"{len(failing)} of 500 reference answers are not verifiable: {failing[:5]}"
    )
    assert all(r.error is None and r.reward == pytest.approx(1.0) for r in boxed)
    wrong = [
        math_reward("<think>w</think> \\boxed{-987654321}", e.answer) for e in result.examples[:50]
    ]
    assert all(r.accuracy == 0.0 for r in wrong)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"dataset file not found: .*nope\.jsonl"):
        load_examples(tmp_path / "nope.jsonl")
    (tmp_path / "rows.csv").write_text("problem,answer\n")
    with pytest.raises(ValueError, match=r"unknown extension '\.csv'; expected one of"):
        load_examples(tmp_path / "rows.csv")
    (tmp_path / "dict.json").write_text('{"problem": "p", "answer": "a"}')
    with pytest.raises(ValueError, match="expected a JSON list of objects, got dict"):
        load_examples(tmp_path / "dict.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match=r"broken\.json is not valid JSON"):
        load_examples(tmp_path / "broken.json")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"broken\.parquet is not a readable Parquet file"):
        load_examples(tmp_path / "broken.parquet")
    with pytest.raises(ValueError, match="answer_format must be one of"):
        load_examples(DATA / "gsm8k" / "test.jsonl", answer_format="boxed")
