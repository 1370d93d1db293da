"""``shuffle-r1 train`` and ``shuffle-r1 eval``."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from shuffle_r1.config import load_config

logger = logging.getLogger(__name__)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="run the RL training loop of a recipe")
    p.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=train)
    p = sub.add_parser("eval", help="evaluate a model (or a checkpoint) on the validation split")
    p.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    p.add_argument("--checkpoint", help="a checkpoint folder (default: the recipe's model)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=evaluate)


def train(args: argparse.Namespace) -> int:
    from services.trainer.loop import Trainer

    cfg = load_config(args.config, args.overrides)
    with Trainer(cfg, resume=args.resume) as trainer:
        summary = trainer.run()
    final = {
        k: v
        for k, v in summary.last_metrics.items()
        if k.startswith(("reward/", "val/", "learner/policy_loss", "time/step_s"))
    }
    print(f"\ntrained {summary.steps} steps in {summary.wall_s:.0f} s")
    print(f"  last step:  {json.dumps(final)}")
    print(f"  metrics:    {summary.metrics_path}")
    print(f"  plots:      {summary.plot_path}")
    print(f"  checkpoint: {summary.checkpoint}")
    return 0


def evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.trainer.loop import Trainer

    overrides = list(args.overrides)
    if args.checkpoint:
        model = Path(args.checkpoint) / "learner" / "model"
        if not model.is_dir():
            raise SystemExit(f"shuffle-r1 eval: {model} is not a checkpoint's model folder")
        overrides.append(f"learner.model_path={model}")
    base = load_config(args.config, overrides)
    # Its own run id and folder: evaluation must not touch a training run's data.
    cfg = load_config(
        args.config,
        [
            *overrides,
            "learner.num_ranks=1",
            f"trainer.run_name={base.trainer.run_name}-eval",
            f"trainer.output_dir={Path(base.trainer.output_dir) / 'eval'}",
        ],
    )
    with Trainer(cfg, resume=False) as trainer:
        result = trainer.evaluate()
    print(json.dumps(result))
    return 0
