"""Reading a recipe (YAML + ``key=value`` overrides) into a checked :class:`Config`, and
writing one back with its secrets redacted."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from shuffle_r1.config.checks import validate
from shuffle_r1.config.schema import (
    REDACTED,
    SECTIONS,
    Config,
    ConfigError,
)
from shuffle_r1.limits import (
    MAX_ECHO_CHARS,
    cut,
    echo,
)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build a :class:`Config` from the defaults, a YAML recipe and ``key=value`` overrides.

    Later sources win: defaults < ``path`` < ``overrides`` (in order). Raises
    :class:`ConfigError` for a missing file, an unknown key, a value of the wrong type, a
    malformed override or a value outside its range; the message names the key.
    """
    base = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        layers += _read_recipe(Path(path))
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {echo(item)} must look like section.key=value")
    if overrides:
        try:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        except (OmegaConfBaseException, yaml.YAMLError) as exc:  # yaml: a value like @x
            why = " ".join(str(exc).split())  # yaml's messages span lines
            raise ConfigError(f"could not parse overrides {echo(list(overrides))}: {why}") from exc
    try:
        merged = OmegaConf.merge(base, *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = cut(str(exc).splitlines()[0], 2 * MAX_ECHO_CHARS)
        where = f" (file {str(path)!r})" if path is not None else ""
        raise ConfigError(f"invalid config at key {echo(key)}{where}: {msg}") from exc
    assert isinstance(cfg, Config)
    return validate(cfg)


def _read_recipe(p: Path) -> list[Any]:
    """The recipe at ``p`` as OmegaConf layers: none for an empty file, else one mapping."""
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
        top = yaml.safe_load(text)  # the shape; OmegaConf's loader then types the values
        layer = OmegaConf.create(text) if isinstance(top, dict) else None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc}") from exc
    except Exception as exc:  # yaml and OmegaConf errors come in several classes
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
    if top is None:  # empty, or only comments: no overrides
        return []
    if layer is None:
        # a list is not shown: its YAML aliases could expand it beyond any size
        held = f"a list of {len(top)} items" if isinstance(top, list) else f"the value {echo(top)}"
        raise ConfigError(
            f"config file {str(p)!r} must be a mapping of sections (data:, rollout:, ... with "
            f"their keys, as in configs/*.yaml); it holds {held}"
        )
    for name, section in top.items():
        if name in SECTIONS and not isinstance(section, dict):
            raise ConfigError(
                f"config file {str(p)!r}: section {name!r} must be a mapping of its keys "
                f"(indented KEY: VALUE lines under {name}:), not {type(section).__name__} "
                f"{echo(section, 80)}"
            )
    return [layer]


def redact_url(url: str) -> str:
    """``url`` with its user and password (also a ``password=`` query argument, which
    redis-py accepts) replaced by ``***``, for messages, logs and saved configs."""
    url = re.sub(r"//.*@", f"//{REDACTED}@", url)
    return re.sub(r"(?i)([?&]password=)[^&#]*", rf"\g<1>{REDACTED}", url)


def redacted(cfg: Config) -> Config:
    """A copy of ``cfg`` whose secrets read ``***``: the tokens that are set (an empty one
    stays empty: none set) and the user and password of ``buffer.redis_url`` and of
    ``trainer.mlflow_tracking_uri``. It still loads; the secrets must be given again (or
    through the environment) to run it."""
    b, r, t = cfg.buffer, cfg.reward, cfg.trainer
    return dataclasses.replace(
        cfg,
        trainer=dataclasses.replace(t, mlflow_tracking_uri=redact_url(t.mlflow_tracking_uri)),
        buffer=dataclasses.replace(
            b, redis_url=redact_url(b.redis_url), auth_token=REDACTED if b.auth_token else ""
        ),
        reward=dataclasses.replace(r, http_token=REDACTED if r.http_token else ""),
    )


def to_yaml(cfg: Config) -> str:
    """``cfg`` as YAML, secrets redacted (:func:`redacted`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(redacted(cfg)))


def save_config(cfg: Config, path: str | Path, comment: str = "") -> None:
    """Write ``cfg`` as YAML (a resolved recipe that :func:`load_config` reads back), after
    ``comment`` as ``#`` lines. Secrets are written as ``***`` (:func:`redacted`): a config
    file on disk never holds a password or a token."""
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    Path(path).write_text(head + to_yaml(cfg))
