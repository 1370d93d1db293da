"""The ``shuffle-r1`` command: the usage below is also its ``--help``.

The entry point lives at the top layer (``services/``), the one place that may import every
package (docs/architecture.md: the arrows only point down); each service's subcommands are
imported when the parser is built, and import Ray, torch and gRPC only when they run, so
``shuffle-r1 --help`` and ``shuffle-r1 config`` start in well under a second.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from shuffle_r1.config import SECTIONS, ConfigError, load_config, to_yaml

DESCRIPTION = """\
Post-train a language model with reinforcement learning from verifiable rewards, with the
Shuffle-R1 recipe (GRPO + Pairwise Trajectory Sampling + Advantage-based Batch Shuffle) on Ray:
vLLM rollout workers, reward workers, a Redis-backed replay buffer and FSDP2/DeepSpeed learners."""

EPILOG = f"""\
examples:
  shuffle-r1 train --config configs/arith_smollm2_cpu.yaml          (the embedded default)
  shuffle-r1 train --config configs/X.yaml learner.lr=2e-6 trainer.total_steps=40
  shuffle-r1 train --config configs/X.yaml --resume               (from its last checkpoint)
  shuffle-r1 eval --config configs/X.yaml --checkpoint outputs/X  (score a checkpoint)
  shuffle-r1 config --config configs/X.yaml                       (check and print a recipe)
  shuffle-r1 config --list                                        (every key, default, help)
  shuffle-r1 scale rollout 4                                      (resize a running job)
  shuffle-r1 buffer serve --redis-url redis://127.0.0.1:6379/0 --port 50051

A recipe is YAML with the sections {", ".join(SECTIONS)};
any key can be overridden as section.key=value after the command.
`shuffle-r1 COMMAND --help` describes a command."""

# modules whose `add_parser(subparsers)` registers commands whose `func(args)` returns an int;
# imported when the parser is built (the buffer's pulls in gRPC, the trainer's Ray)
SERVICE_COMMANDS = (
    "services.trainer.cli",  # train, eval, scale
    "services.replay_buffer.cli",  # buffer serve
)


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    if args.check:
        from services.trainer.preflight import preflight, report_problems

        if report_problems("shuffle-r1 config", preflight(cfg), started=False):
            return 2
        weighted = [f"{w:g} * {fn}" for _, fn, w in cfg.reward.weighted_functions()]
        print(
            f"ok: model {cfg.learner.model_path}, data {cfg.data.train_path} and "
            f"{cfg.data.val_path}, reward "
            + (" + ".join(weighted) if cfg.reward.functions else cfg.reward.function),
            file=sys.stderr,
        )
    if args.list:
        from shuffle_r1.config.listing import list_keys

        print(list_keys(cfg), end="")
    else:
        print(to_yaml(cfg), end="")
    return 0


def _add_verbose(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="debug logging"
    )


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser`` (``buffer serve`` included), depth first."""
    found = []
    for action in parser._actions:  # argparse keeps no public list of its subparsers
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to one parser
                found += [child, *_subparsers(child)]
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shuffle-r1",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_verbose(parser, False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser(
        "config",
        help="check a recipe and print it resolved (secrets as ***)",
        description="Load a recipe with its overrides, check every value, and print the "
        "resolved recipe as YAML (secrets as ***), or with --list every key with its value "
        "and help. Exit 2 naming the key when a value is wrong (with --check, also a model, "
        "data file or reward function that would fail at the start of `train`).",
    )
    p.add_argument("--config", help="YAML recipe (configs/*.yaml); default: the built-in defaults")
    p.add_argument("--list", action="store_true", help="every key with its value and its help")
    p.add_argument(
        "--check",
        action="store_true",
        help="also check what `train` checks before it starts: the model resolves (a built-in "
        "name, a folder or a Hugging Face id), the data files parse, the reward function "
        "imports and takes the workers' call",
    )
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=_cmd_config)
    for module_name in SERVICE_COMMANDS:
        importlib.import_module(module_name).add_parser(sub)
    for child in _subparsers(parser):
        if "verbose" not in {a.dest for a in child._actions}:
            # after the command too (`train ... -v`); SUPPRESS keeps a -v given before it
            _add_verbose(child, argparse.SUPPRESS)
    return parser


def _check_one_config(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """A second ``--config`` would silently replace the first (argparse keeps the last)."""
    given = [a for a in argv if a == "--config" or a.startswith("--config=")]
    if len(given) > 1:
        parser.error(
            "--config given more than once: one recipe per run; change single keys with "
            "section.key=value overrides"
        )


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides allowed anywhere after the command
    (``eval --config X --checkpoint D data.val_path=F``: argparse alone takes positionals
    only in one run). Anything else it does not know is an error, as usual."""
    parser = build_parser()
    _check_one_config(parser, sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    overrides = [e for e in extra if "=" in e and not e.startswith("-")]
    if extra != overrides or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"shuffle-r1: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
