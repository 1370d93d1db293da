"""Every configuration key with its value and its help, for ``shuffle-r1 config --list``.

The help is the comment that :mod:`~shuffle_r1.config.schema` writes beside a key (on its
line) or just above it (the comment lines between the previous key and this one), so the
schema stays the one place a key is described. A key with neither has empty help.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
from typing import Any

from shuffle_r1.config import schema
from shuffle_r1.config.recipe import redacted
from shuffle_r1.config.schema import Config


def key_help() -> dict[str, str]:
    """``{"section.key": help}`` for every key of :class:`~shuffle_r1.config.schema.Config`,
    read from the comments in ``schema.py``'s source (tokenized, so a ``#`` inside a string
    default is not a comment)."""
    sections = {
        f.type if isinstance(f.type, str) else f.type.__name__: f.name
        for f in dataclasses.fields(Config)
    }
    out: dict[str, str] = {}
    source = inspect.getsource(schema)
    section: str | None = None
    above: list[str] = []  # comment lines since the last key
    line_tokens: list[tokenize.TokenInfo] = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NEWLINE or tok.type == tokenize.NL:
            section, above = _line(line_tokens, section, above, sections, out)
            line_tokens = []
        else:
            line_tokens.append(tok)
    return out


def _line(
    toks: list[tokenize.TokenInfo],
    section: str | None,
    above: list[str],
    sections: dict[str, str],
    out: dict[str, str],
) -> tuple[str | None, list[str]]:
    """Reads one source line's tokens: a class header opens a section, a comment-only line
    adds to the comment above the next key, ``name: type = ...`` records a key."""
    significant = [t for t in toks if t.type not in (tokenize.INDENT, tokenize.DEDENT)]
    if not significant:
        return section, above  # a blank line keeps the comment block (rare in the schema)
    first = significant[0]
    if first.type == tokenize.NAME and first.string == "class" and first.start[1] == 0:
        name = significant[1].string
        return sections.get(name), []
    if first.start[1] == 0 and first.type != tokenize.COMMENT:
        return None, []  # module level: outside any section
    if first.type == tokenize.COMMENT:
        return section, [*above, first.string.lstrip("#").strip()]
    if (
        section is not None
        and first.type == tokenize.NAME
        and len(significant) > 1
        and significant[1].string == ":"
        and first.start[1] == 4
    ):
        trailing = [t.string.lstrip("#").strip() for t in significant if t.type == tokenize.COMMENT]
        out[f"{section}.{first.string}"] = " ".join([*above, *trailing]).strip()
    return section, []


def list_keys(cfg: Config, width: int = 100) -> str:
    """Every key of ``cfg`` as ``section.key = value`` (JSON; secrets as ``***``), its help
    wrapped under it, sections in the schema's order."""
    helps = key_help()
    lines: list[str] = []
    shown = redacted(cfg)
    for f in dataclasses.fields(Config):
        lines.append(f"[{f.name}]")
        section: Any = getattr(shown, f.name)
        for key in dataclasses.fields(section):
            name = f"{f.name}.{key.name}"
            value = getattr(section, key.name)  # reward.functions: a list of dataclasses
            lines.append(f"{name} = {json.dumps(value, default=dataclasses.asdict)}")
            text = helps.get(name, "")
            if text:
                pad = " " * 4
                lines.extend(textwrap.wrap(text, width, initial_indent=pad, subsequent_indent=pad))
        lines.append("")
    return "\n".join(lines)
