"""What a reward function receives and returns, and how several combine (``reward.functions``).

A reward function is called one of two ways, chosen once from its signature
(:func:`takes_record`, the one rule the reward workers and the preflight check both use):

- **record**: a function whose one required parameter is positional and annotated
  :class:`RewardInput` or named ``record`` (``fn(record: RewardInput)``) gets a
  :class:`RewardInput` (prompt, response, reference answer, the dataset row's other columns,
  the number of images);
- **legacy**: any other, ``fn(response, reference_answer, accuracy_weight=...,
  format_weight=..., timeout_s=...)``, as :func:`shuffle_r1.rewards.math_reward`.

It returns a float, a :class:`~shuffle_r1.rewards.RewardResult`, or a dict of named scores
(``{"correct": 1.0, "brevity": 0.2}``), which :func:`named_scores` reads as a total and its
parts. :func:`combine` adds the functions' totals with their weights into one
:class:`~shuffle_r1.rewards.RewardResult`; the named scores travel on it to the step metrics
(``reward/<name>``).
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shuffle_r1.rewards.math import RewardResult

# A named score's name: it becomes the metric reward/<name> (metrics.jsonl, plots)
SCORE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
# names the step metrics already use for something else (reward/mean, reward/errors)
RESERVED_SCORE_NAMES = ("mean", "errors")
MAX_NAMED_SCORES = 16  # per function: each becomes a metric column


@dataclass(frozen=True)
class RewardInput:
    """One rollout to score, as a record-taking reward function receives it.

    - ``response``: the decoded completion (special tokens removed).
    - ``reference_answer``: the dataset's answer for the prompt (after ``data.answer_format``).
    - ``prompt``: the user turn's text as ``data.prompt_template`` rendered it, before the
      model's chat template; each image's place is marked ``<image>``. ``""`` when the caller
      did not send one (the HTTP endpoint's optional field).
    - ``row``: the dataset row's other columns (every column except ``data.problem_key``,
      ``data.answer_key`` and ``data.image_key``), JSON values only (str, int, float, bool,
      None, lists, dicts); a column holding anything else (bytes, a timestamp) is left out.
    - ``num_images``: how many images the prompt carries (0 for text).

    Picklable: it travels through Ray and into the reward processes as it is.
    """

    response: str
    reference_answer: str
    prompt: str = ""
    row: Mapping[str, Any] = field(default_factory=dict)
    num_images: int = 0


def takes_record(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` is called with a :class:`RewardInput` rather than the legacy
    ``(response, reference_answer, **weights)``: its one required parameter is positional and
    annotated ``RewardInput`` (the class, or its name as a string annotation) or named
    ``record``. A callable whose signature cannot be read gets the legacy call."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [
        p
        for p in params
        if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if len(required) != 1 or required[0].kind not in positional:
        return False
    [param] = required
    hint = param.annotation
    named = isinstance(hint, str) and hint.rpartition(".")[2] == RewardInput.__name__
    return hint is RewardInput or named or param.name == "record"


def call_reward(fn: Callable[..., Any], record: RewardInput, **legacy_kwargs: Any) -> Any:
    """``fn(record)`` for a record-taking function (:func:`takes_record`), else
    ``fn(record.response, record.reference_answer, **legacy_kwargs)``; what it returns."""
    if takes_record(fn):
        return fn(record)
    return fn(record.response, record.reference_answer, **legacy_kwargs)


def named_scores(value: Any) -> tuple[float, dict[str, float], str | None]:
    """One function's return value as ``(total, named scores, error)``:

    - a float (or int): ``(value, {}, None)``;
    - a :class:`~shuffle_r1.rewards.RewardResult`: ``(reward, {"accuracy", "format"},
      error)``;
    - a dict ``name -> float``: ``(sum of the values, the dict, None)``; names match
      :data:`SCORE_NAME`, at most :data:`MAX_NAMED_SCORES`, not ``mean`` or ``errors``.

    Raises:
        TypeError: any other type, or a dict with a key or value of the wrong type.
        ValueError: a non-finite total or score, a bad or reserved name, too many names.
    """
    if isinstance(value, RewardResult):
        total, named = value.reward, {"accuracy": value.accuracy, "format": value.format}
        error = value.error
    elif isinstance(value, int | float) and not isinstance(value, bool):
        total, named, error = float(value), {}, None
    elif isinstance(value, Mapping):
        if len(value) > MAX_NAMED_SCORES:
            raise ValueError(f"returned {len(value)} named scores; at most {MAX_NAMED_SCORES}")
        named = {}
        for name, score in value.items():
            if not isinstance(name, str):
                raise TypeError(f"returned a score named {name!r}; names are strings")
            if not SCORE_NAME.fullmatch(name) or name in RESERVED_SCORE_NAMES:
                raise ValueError(
                    f"returned a score named {name[:80]!r}; names match {SCORE_NAME.pattern} "
                    f"and are not {list(RESERVED_SCORE_NAMES)}"
                )
            if isinstance(score, bool) or not isinstance(score, int | float):
                raise TypeError(f"returned score {name!r} = {type(score).__name__}, not a float")
            if not math.isfinite(score):
                raise ValueError(f"returned a non-finite score {name!r} = {score!r}")
            named[name] = float(score)
        total, error = sum(named.values()), None
    else:
        raise TypeError(
            f"returned {type(value).__name__}, expected a float, a dict of named floats or a "
            "RewardResult"
        )
    if not math.isfinite(total):
        raise ValueError(f"returned a non-finite reward {total!r}")
    return total, named, error


def combine(parts: Sequence[tuple[float, Any, str | None]]) -> RewardResult:
    """The reward of one rollout from its functions' outcomes, ``(weight, value, error)`` each
    (``value`` what the function returned; ``error`` why it returned nothing, then ``value``
    is ignored): ``reward = sum(weight * total)`` over the functions (:func:`named_scores`).

    A function that failed, or returned something :func:`named_scores` refuses, adds 0 and
    its error (``"raised: ..."`` for a refused value) becomes the result's ``error`` (the
    first one, when several failed). ``scores`` holds every function's named scores; two
    functions naming the same score is an error too (its second value is dropped).
    ``accuracy`` / ``format`` are the scores so named, 0 without one, except that a reward
    with no named score at all is its own accuracy (a plain float, as before).
    """
    reward = 0.0
    scores: dict[str, float] = {}
    errors: list[str] = []
    for weight, value, error in parts:
        if error is None:
            try:
                total, named, error = named_scores(value)
            except (TypeError, ValueError) as exc:
                errors.append(f"raised: {exc}")
                continue
            reward += weight * total
            for name in set(named) & set(scores):
                errors.append(f"raised: two reward functions return a score named {name!r}")
            scores.update({k: v for k, v in named.items() if k not in scores})
        if error is not None:
            errors.append(error)
    accuracy = scores.get("accuracy", 0.0 if scores else reward)
    return RewardResult(
        reward=reward,
        accuracy=accuracy,
        format=scores.get("format", 0.0),
        error=errors[0][:500] if errors else None,
        scores=scores,
    )
