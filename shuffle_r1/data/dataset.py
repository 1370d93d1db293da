"""Reading prompt datasets: JSONL, JSON and Parquet files of (problem, answer[, images]) rows.

A malformed row never stops a load: it is skipped and reported (:class:`SkippedRow`: file,
1-based row number, reason), and the caller decides what to do with the report. Problems that
concern the whole file (it does not exist, its extension is unknown, it is not valid JSON or
Parquet) raise.

Images are kept as references: a path (resolved against ``image_root`` or the data file's
folder, and checked to exist) or the raw bytes of an encoded image (Parquet files written by
Hugging Face ``datasets`` store ``{"bytes": ..., "path": ...}``). Given an ``image_spec``, the
loader also runs the multimodal pipeline on each row's images (``shuffle_r1.data.images``:
decode, RGB, resize to ``data.min_pixels``–``data.max_pixels``, PNG bytes), so an image that
cannot be used — corrupt bytes, not an image, an aspect ratio the vision tower refuses — skips
its row here, before any training, with the file and the row named.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shuffle_r1.data.images import ImageError, ImageSpec
from shuffle_r1.limits import MAX_PROMPT_ID_BYTES, echo

logger = logging.getLogger(__name__)

ANSWER_FORMATS = ("raw", "gsm8k")
EXTENSIONS = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Example:
    """One prompt: ``uid`` is unique within its file; ``answer`` is the reference answer that
    the reward compares against; ``images`` are paths (str) or encoded image bytes (PNG bytes
    on the vision grid when loaded with an ``image_spec``); ``columns`` are the row's other
    columns (all but the problem, answer and image columns) whose values are JSON (a column
    holding bytes or a timestamp is left out): the prompt template and record-taking reward
    functions see them (``shuffle_r1.data.prompt``, ``shuffle_r1.rewards.RewardInput``)."""

    uid: str
    problem: str
    answer: str
    images: tuple[bytes | str, ...] = ()
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SkippedRow:
    """A row that was not loaded. ``row`` is 1-based: the line of a JSONL file, the position
    of the record in a JSON list or a Parquet table."""

    path: str
    row: int
    reason: str

    def __str__(self) -> str:
        unit = "line" if self.path.endswith(".jsonl") else "row"
        return f"{self.path} {unit} {self.row}: {self.reason}"


@dataclass
class LoadResult:
    """The examples that were read, in file order, and the rows that were skipped."""

    examples: list[Example]
    skipped: list[SkippedRow] = field(default_factory=list)


class _BadRow(ValueError):
    """A row that cannot become an Example; the message is the reason recorded."""


def load_examples(
    path: str | Path,
    problem_key: str = "problem",
    answer_key: str = "answer",
    image_key: str = "images",
    id_key: str | None = None,
    answer_format: str = "raw",
    image_root: str | Path | None = None,
    image_spec: ImageSpec | None = None,
    limit: int | None = None,
) -> LoadResult:
    """Read the examples of a ``.jsonl``, ``.json`` (a list of objects) or ``.parquet`` file.

    - ``problem_key``: a non-empty string. ``answer_key``: a string or a number.
    - ``image_key``: optional in each row; a path, encoded bytes, a ``{"bytes", "path"}`` dict,
      or a list of those. Relative paths are resolved against ``image_root`` (default: the data
      file's folder); a missing image file skips the row.
    - ``image_spec``: when given, every image of a row is prepared by
      :meth:`ImageSpec.prepare <shuffle_r1.data.images.ImageSpec.prepare>` (PNG bytes on the
      vision grid); an image it cannot use skips the row, the reason naming the image.
    - ``limit``: stop once this many examples are loaded (the rows after them are not read,
      nor their images prepared); ``None`` reads the whole file.
    - ``id_key``: the column that holds a unique id, at most ``MAX_PROMPT_ID_BYTES`` bytes of
      UTF-8 (it becomes the group's prompt id in the replay buffer; a longer one skips its
      row); without it ``uid`` is ``"<stem>-<row>"``.
    - ``answer_format``: ``"raw"`` keeps the answer as written; ``"gsm8k"`` keeps the text
      after the final ``####``, stripped, without thousands commas (``"1,000"`` -> ``"1000"``).

    Raises FileNotFoundError for a missing file and ValueError for an unknown extension or
    ``answer_format``, or a file that is not valid JSON / Parquet as a whole.
    """
    path = Path(path)
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise ValueError(
            f"dataset file {path}: unknown extension {path.suffix!r}; expected one of {EXTENSIONS}"
        )
    root = Path(image_root) if image_root else path.parent
    result = LoadResult(examples=[])
    first_row_of_id: dict[str, int] = {}
    for row_number, record in reader(path):
        if limit is not None and len(result.examples) >= limit:
            break
        try:
            if isinstance(record, _BadRow):
                raise record
            example = _to_example(
                record,
                default_uid=f"{path.stem}-{row_number}",
                problem_key=problem_key,
                answer_key=answer_key,
                image_key=image_key,
                id_key=id_key,
                image_root=root,
                answer_format=answer_format,
                image_spec=image_spec,
            )
            if example.uid in first_row_of_id:
                first = first_row_of_id[example.uid]
                raise _BadRow(f"duplicate {id_key} {example.uid!r} (first at row {first})")
        except _BadRow as exc:
            result.skipped.append(SkippedRow(str(path), row_number, str(exc)))
            continue
        first_row_of_id[example.uid] = row_number
        result.examples.append(example)
    if result.skipped:
        logger.warning(
            "%s: loaded %d examples, skipped %d rows (first: %s)",
            path,
            len(result.examples),
            len(result.skipped),
            result.skipped[0],
        )
    else:
        logger.info("%s: loaded %d examples", path, len(result.examples))
    return result


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                yield line_number, _BadRow(f"not UTF-8: {exc}")
                continue
            if not line:
                continue  # blank lines (a trailing newline) are not rows
            try:
                yield line_number, json.loads(line)
            except (ValueError, RecursionError) as exc:  # also too deep, or a 5000-digit int
                yield line_number, _BadRow(f"invalid JSON: {exc}")


def _read_json(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, too deep, huge ints
        raise ValueError(f"dataset file {path} is not valid JSON: {exc}") from exc
    if not isinstance(records, list):
        raise ValueError(
            f"dataset file {path}: expected a JSON list of objects, got {type(records).__name__}"
        )
    yield from enumerate(records, start=1)


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError, ValueError) as exc:  # ValueError: non-UTF-8 names
        raise ValueError(f"dataset file {path} is not a readable Parquet file: {exc}") from exc
    row_number = 0
    try:
        for batch in parquet.iter_batches():
            for record in batch.to_pylist():
                row_number += 1
                yield row_number, record
    except (pa.ArrowException, OSError, ValueError) as exc:  # a damaged page or text
        raise ValueError(
            f"dataset file {path} is not a readable Parquet file after row {row_number}: {exc}"
        ) from exc


def _to_example(
    record: Any,
    *,
    default_uid: str,
    problem_key: str,
    answer_key: str,
    image_key: str,
    id_key: str | None,
    image_root: Path,
    answer_format: str,
    image_spec: ImageSpec | None,
) -> Example:
    if not isinstance(record, dict):
        raise _BadRow(f"expected an object, got {type(record).__name__}")
    problem = record.get(problem_key)
    if not isinstance(problem, str):
        raise _BadRow(_missing_or_type(record, problem_key, "a string"))
    if not problem.strip():
        raise _BadRow(f"empty {problem_key!r}")
    answer = _answer(record, answer_key, answer_format)
    if id_key:
        uid = record.get(id_key)
        if isinstance(uid, bool) or not isinstance(uid, str | int) or uid == "":
            raise _BadRow(_missing_or_type(record, id_key, "a non-empty string or an integer"))
        uid = str(uid)
        try:
            size = len(uid.encode("utf-8"))
        except UnicodeEncodeError as exc:  # JSON allows lone surrogates ("\ud800")
            raise _BadRow(f"{id_key!r} {echo(uid, 80)} is not valid Unicode: {exc.reason}") from exc
        if size > MAX_PROMPT_ID_BYTES:  # the id becomes the group's prompt id in the buffer
            raise _BadRow(
                f"{id_key!r} {echo(uid, 80)} is {size} bytes of UTF-8; the replay buffer takes "
                f"ids of at most {MAX_PROMPT_ID_BYTES} (shuffle_r1.limits.MAX_PROMPT_ID_BYTES)"
            )
    else:
        uid = default_uid
    images = _images(record.get(image_key), image_key, image_root)
    if image_spec is not None:
        try:
            images = tuple(image_spec.prepare(image) for image in images)
        except ImageError as exc:
            raise _BadRow(str(exc)) from exc
    taken = (problem_key, answer_key, image_key)
    columns = {k: v for k, v in record.items() if k not in taken and _is_json(v)}
    return Example(uid=uid, problem=problem, answer=answer, images=images, columns=columns)


def _is_json(value: Any) -> bool:
    """Whether ``value`` is plain JSON (finite numbers; what a reward row may carry)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _answer(record: dict[str, Any], key: str, answer_format: str) -> str:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _BadRow(_missing_or_type(record, key, "a string or a number"))
    answer = str(value).strip()
    if answer_format == "gsm8k":
        if "####" not in answer:
            raise _BadRow(f"{key!r} has no '####' (answer_format='gsm8k')")
        answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise _BadRow(f"empty {key!r}")
    return answer


def _images(value: Any, key: str, image_root: Path) -> tuple[bytes | str, ...]:
    if value is None:
        return ()
    items = value if isinstance(value, list) else [value]
    images: list[bytes | str] = []
    for item in items:
        if isinstance(item, dict):  # Hugging Face datasets' Image feature
            item = item.get("bytes") or item.get("path")
        if isinstance(item, bytes) and item:
            images.append(item)
        elif isinstance(item, str) and item:
            resolved = image_root / item  # an absolute item stays absolute
            try:
                found = resolved.is_file()
            except OSError as exc:  # e.g. a name longer than the file system allows
                raise _BadRow(f"image path {item[:80]!r} is not usable: {exc.strerror}") from exc
            if not found:
                raise _BadRow(f"image file not found: {resolved}")
            images.append(str(resolved))
        else:
            raise _BadRow(
                f"{key!r} must hold a path, bytes or a list of them, got {type(item).__name__}"
            )
    return tuple(images)


def _missing_or_type(record: dict[str, Any], key: str, expected: str) -> str:
    if key not in record:
        return f"missing key {key!r} (keys: {sorted(record)})"
    return f"{key!r} must be {expected}, got {type(record[key]).__name__}"
