"""The ``shuffle-r1`` command.

    shuffle-r1 train --config configs/X.yaml [--resume] [key=value ...]   train a recipe
    shuffle-r1 eval --config configs/X.yaml [--checkpoint DIR]          evaluate
    shuffle-r1 config --config configs/X.yaml [key=value ...]   print the resolved recipe
                                                                (secrets shown as ***)
    shuffle-r1 scale rollout N [--run R] [--address A]       resize a running job's rollout workers
    shuffle-r1 buffer serve --redis-url URL --port P ...        run the replay buffer service

The entry point lives at the top layer (``services/``), the one place that may import every
package (docs/architecture.md: the arrows only point down); each service's subcommands are
imported when the parser is built, so ``shuffle-r1 config`` starts without Ray.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from shuffle_r1.config import ConfigError, load_config, to_yaml

# modules whose `add_parser(subparsers)` registers commands whose `func(args)` returns an int;
# imported when the parser is built (the buffer's pulls in gRPC, the trainer's Ray)
SERVICE_COMMANDS = (
    "services.trainer.cli",  # train, eval, scale
    "services.replay_buffer.cli",  # buffer serve
)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(to_yaml(cfg), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shuffle-r1", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="check a recipe and print it resolved (secrets as ***)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)
    for module_name in SERVICE_COMMANDS:
        importlib.import_module(module_name).add_parser(sub)
    return parser


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with ``key=value`` overrides allowed anywhere after the command
    (``eval --config X --checkpoint D data.val_path=F``: argparse alone takes positionals
    only in one run). Anything else it does not know is an error, as usual."""
    parser = build_parser()
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
