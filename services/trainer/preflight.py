"""Checks a run makes before Ray starts, so that a user's mistake fails in a second as one
line naming the key, not minutes later as a traceback in a worker's log.

:func:`preflight` checks what :func:`shuffle_r1.config.load_config` cannot without touching
files, the network or imports: that the model resolves (a built-in name, a local folder or a
Hugging Face id, :func:`shuffle_r1.models.resolve_model_path`), that both data files exist
and their first rows parse with the configured columns and render with
``data.prompt_template``, that each reward function imports and takes the arguments the
reward workers pass, and that the library of each experiment tracker in ``trainer.loggers``
is installed. :func:`check_output_folder` refuses to start a fresh run over an earlier one
unless ``trainer.overwrite`` is set.
``shuffle-r1 train`` runs both; ``shuffle-r1 config --check`` runs :func:`preflight`.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shuffle_r1.config import Config, ConfigError, check_reward_function

# rows of each data file read to check it: enough to catch a wrong column or format
SAMPLE_ROWS = 8


@dataclass(frozen=True)
class Problem:
    """One failed check: the config key it concerns and what is wrong, in one line."""

    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def report_problems(command: str, problems: list[Problem], started: bool = True) -> bool:
    """Print each problem as one line on stderr, then their count (``started``: saying that
    nothing was started); whether there were any."""
    for problem in problems:
        print(f"{command}: {problem}", file=sys.stderr)
    if problems:
        count = f"{len(problems)} problem(s)"
        print(f"{command}: nothing was started ({count})" if started else f"{command}: {count}",
              file=sys.stderr)  # fmt: skip
    return bool(problems)


def preflight(cfg: Config, check_model: bool = True) -> list[Problem]:
    """Every problem found, in the order model, data, reward, trackers; ``[]`` when the run
    can start.

    ``check_model=False`` skips resolving the model (which may convert or download it)."""
    problems: list[Problem] = []
    if check_model:
        problems += model_problems(cfg)
    problems += _check_data(cfg)
    try:
        check_reward_function(cfg)
    except ConfigError as exc:  # "<key>=<value>: why"
        key, _, rest = str(exc).partition("=")
        problems.append(Problem(key, rest))
    problems += _check_trackers(cfg)
    return problems


def _check_trackers(cfg: Config) -> list[Problem]:
    from services.trainer.trackers import missing_packages

    return [
        Problem(
            "trainer.loggers",
            f"{name} needs {packages}, which this Python does not have: pip install "
            f"{packages} (the versions in requirements/pins.txt), or leave {name} out",
        )
        for name, packages in missing_packages(cfg.trainer).items()
    ]


def model_problems(cfg: Config) -> list[Problem]:
    """``learner.model_path`` resolves (a built-in name, a folder, a Hugging Face id)."""
    from shuffle_r1.models import resolve_model_path

    try:
        resolve_model_path(cfg.learner.model_path)
    except (FileNotFoundError, OSError, ValueError) as exc:
        return [Problem("learner.model_path", _one_line(exc))]
    return []


def _check_data(cfg: Config) -> list[Problem]:
    from shuffle_r1.data.prompt import load_prompt_template, messages_for
    from shuffle_r1.data.splits import load_data_file

    d = cfg.data
    problems = []
    try:
        template = load_prompt_template(d.prompt_template)
    except ValueError as exc:  # a file that cannot be read, a syntax error
        problems.append(_template_problem(exc))
        template = None
    data_log = logging.getLogger("shuffle_r1.data")  # its "loaded N examples" lines
    for key, path in (("data.train_path", d.train_path), ("data.val_path", d.val_path)):
        try:
            with _quiet(data_log):
                result = load_data_file(d, path, SAMPLE_ROWS)
        except (OSError, ValueError) as exc:  # missing, unknown extension, not JSON/Parquet
            problems.append(Problem(key, f"{path!r}: {_one_line(exc)}"))
            continue
        if not result.examples:
            first = result.skipped[0] if result.skipped else None
            why = f"every row read was skipped; the first: {first}" if first else "it is empty"
            problems.append(Problem(key, f"{path!r} gives no problems: {why}"))
        if template is None:
            continue
        try:
            for example in result.examples:
                messages_for(template.render(example), len(example.images))
        except ValueError as exc:  # a variable the row lacks, image marks that do not fit
            problems.append(_template_problem(exc, f"{path!r}: "))
            template = None  # one line is enough: the next rows would say the same
    return problems


def _template_problem(exc: ValueError, where: str = "") -> Problem:
    """``data.prompt_template``'s problem, its message without the key it starts with (a
    file's ``=file:path`` kept)."""
    from shuffle_r1.data.prompt import TEMPLATE_KEY

    why = _one_line(exc).removeprefix(TEMPLATE_KEY).removeprefix(": ").removeprefix("=")
    return Problem(TEMPLATE_KEY, where + why)


@contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """Holds ``logger`` at ERROR inside ``with``: a check prints only its problems."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# What a run leaves in trainer.output_dir that a fresh run would mix with its own: the
# metrics and prompt logs it appends to, and checkpoints that --resume would pick up.
RUN_FILES = ("metrics.jsonl", "prompts.jsonl")
RUN_DIRS = ("checkpoints",)


def earlier_run(output_dir: Path) -> list[str]:
    """What of an earlier run ``output_dir`` holds (names, for the message); ``[]`` if none."""
    found = [name for name in RUN_FILES if (output_dir / name).is_file()]
    for name in RUN_DIRS:
        folder = output_dir / name
        if folder.is_dir() and any(folder.iterdir()):
            found.append(f"{name}/ ({sum(1 for _ in folder.iterdir())} entries)")
    return found


def check_output_folder(cfg: Config, resume: bool) -> Problem | None:
    """Refuse a fresh run (no ``--resume``) in a folder holding an earlier run, unless
    ``trainer.overwrite``; with it, remove that run's logs and checkpoints (so a later
    ``--resume`` cannot pick up the old run's). Call it holding the run lock
    (:mod:`services.trainer.runlock`), so that no running run's files are removed."""
    out = Path(cfg.trainer.output_dir)
    if resume:
        return None
    found = earlier_run(out)
    if not found:
        return None
    if not cfg.trainer.overwrite:
        return Problem(
            "trainer.output_dir",
            f"{str(out)!r} holds an earlier run ({', '.join(found)}): continue it with "
            "--resume, start over with trainer.overwrite=true (its logs and checkpoints are "
            "deleted), or choose another trainer.output_dir",
        )
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for name in RUN_DIRS:
        shutil.rmtree(out / name, ignore_errors=True)
    return None
