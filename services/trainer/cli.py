"""``shuffle-r1 train``, ``shuffle-r1 eval`` and ``shuffle-r1 scale rollout N``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from services.trainer.preflight import (
    check_output_folder,
    model_problems,
    preflight,
    report_problems,
)
from shuffle_r1.config import check_reward_function, load_config

logger = logging.getLogger(__name__)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="run the RL training loop of a recipe")
    p.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=train)
    p = sub.add_parser(
        "eval",
        help="score a checkpoint (or the base model) on any dataset file",
        description="Score a checkpoint, or the recipe's own model (--base), on data.val_path "
        "(any file in the project's formats; data.val_size=N takes its first N problems, 0 "
        "all) at rollout.val_temperature with rollout.val_n samples a problem, and write a "
        "JSON summary with the accuracy and its 95%% Wilson interval.",
    )
    p.add_argument("--config", help="YAML recipe (configs/*.yaml)")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--checkpoint",
        help="a checkpoint folder (checkpoints/step_N) or a run's output folder (its newest "
        "complete checkpoint)",
    )
    which.add_argument(
        "--base", action="store_true", help="the recipe's model, learner.model_path (default)"
    )
    p.add_argument("--out", help="the JSON summary (default: <output_dir>/eval/eval_summary.json)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=evaluate)
    p = sub.add_parser("scale", help="change the number of workers of a running job's role")
    p.add_argument("role", choices=["rollout"], help="the role to scale")
    p.add_argument("num_workers", type=int, help="workers to run")
    p.add_argument("--run", help="the run (trainer.run_name); default: the only running one")
    p.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    p.add_argument("--namespace", default="shuffle-r1", help="the job's cluster.namespace")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the workers")
    p.set_defaults(func=scale)


def train(args: argparse.Namespace) -> int:
    """Train ``args.config``; 0 when every step ran. SIGINT (Ctrl-C) or SIGTERM abandons the
    step in progress and exits with 130 or 143 within seconds, every process the run started
    stopped (``services.trainer.stopping``); ``--resume`` continues from the last complete
    checkpoint. Exits 3 at once, before Ray starts, when another run holds the output
    folder (``services.trainer.runlock``), and 74 when the output cannot be written (a full
    disk, a quota: ``shuffle_r1.integrity.OutputWriteError``), nothing restarted and the
    last complete checkpoint intact. Exits 2, before Ray starts, for a user's mistake, one line
    each (:mod:`services.trainer.preflight`): a model that does not resolve, a data file that
    is missing or gives no problems, a reward function that does not import or cannot take
    the workers' call, an output folder holding an earlier run without ``--resume`` or
    ``trainer.overwrite=true``."""
    import ray

    from services.trainer.bootstrap import init_ray
    from services.trainer.loop import Trainer
    from services.trainer.reaper import start_reaper
    from services.trainer.runlock import RunLock, RunLockedError
    from services.trainer.state import latest_checkpoint
    from services.trainer.stopping import StopOnSignal
    from shuffle_r1.integrity import OutputWriteError

    cfg = load_config(args.config, args.overrides)
    resume = args.resume or cfg.trainer.resume
    # model, data and reward function, here, not minutes later in a worker
    if report_problems("shuffle-r1 train", preflight(cfg)):
        return 2
    try:  # before Ray starts: a second run in the folder is refused at once
        lock = RunLock(cfg.trainer.output_dir).acquire()
    except RunLockedError as exc:
        print(f"shuffle-r1 train: {exc}", file=sys.stderr)
        return 3
    problem = check_output_folder(cfg, resume)  # holding the lock: no live run's files
    if problem is not None:
        lock.release()
        report_problems("shuffle-r1 train", [problem])
        return 2
    start_reaper()  # before Ray and Redis start: nothing of the run outlives this process
    with lock, StopOnSignal() as stop:
        trainer: Trainer | None = None
        try:
            with stop.held():  # ray.init would put its own SIGTERM handler in place of ours
                init_ray(cfg)
            # ... and its core worker a C-level one (abseil's failure handler: it logs, then
            # aborts): installing ours again takes the signals back at the C level too
            stop.install()
            trainer = Trainer(cfg, resume=resume)
            try:
                summary = trainer.run()
            except OutputWriteError as exc:  # a full disk is the operator's, not a crash
                print(f"shuffle-r1 train: {exc}", file=sys.stderr)
                return 74  # EX_IOERR
            finally:
                if stop.signum is None:  # an error, or the end: stop the roles gracefully
                    trainer.close()
        except KeyboardInterrupt:
            if trainer is None:
                abandoned = "the start"
            elif trainer.state.step < cfg.trainer.total_steps:
                abandoned = f"step {trainer.state.step + 1}"  # 1-based, as checkpoints count
            else:
                abandoned = "the shutdown"
            print(file=sys.stderr)  # ends the progress bar's line
            logger.warning(
                "interrupted (%s): abandoning %s; last complete checkpoint: %s",
                stop.signal_name,
                abandoned,
                latest_checkpoint(Path(cfg.trainer.output_dir), verify=False) or "none",
            )
            if trainer is not None:
                trainer.close(abandon=True)  # shuts Ray down too
            else:
                ray.shutdown()
            return stop.finish()
    final = {
        k: v
        for k, v in summary.last_metrics.items()
        if k.startswith(("reward/", "val/", "learner/policy_loss", "time/step_s"))
    }
    print(
        f"\ntrained {summary.steps} steps in {summary.train_s:.0f} s "
        f"({summary.wall_s:.0f} s with the setup; precision {trainer.precision_text})"
    )
    held = summary.held_out
    if held:
        n = held["n_eval"]

        def acc(key: str) -> str:
            low, high = held[f"{key}_ci"]
            return f"{held[key]:.3f} (95% CI {low:.3f}-{high:.3f})"

        if "acc_before" in held:
            print(f"  held-out accuracy before training:  {acc('acc_before')}, n = {n}")
        print(f"  held-out accuracy after {held['after_step']} steps: {acc('acc_after')}, n = {n}")
        if "gain" in held:
            print(f"  gain: {100 * held['gain']:+.1f} points")
    print(f"  last step:  {json.dumps(final)}")
    print(f"  summary:    {summary.path}")
    print(f"  metrics:    {summary.metrics_path}")
    print(f"  plots:      {summary.plot_path}")
    print(f"  checkpoint: {summary.checkpoint}")
    return 0


def checkpoint_model(path: Path) -> tuple[Path, Path]:
    """``(checkpoint folder, its model folder)`` for ``path``: a checkpoint folder
    (``checkpoints/step_N``, whose ``learner/model`` is the model in transformers format)
    or a run's output folder (its newest complete checkpoint).

    Raises:
        ValueError: ``path`` is neither, named with what was looked for.
    """
    from services.trainer.state import latest_checkpoint

    if (path / "learner" / "model").is_dir():
        return path, path / "learner" / "model"
    if (path / "checkpoints").is_dir():
        newest = latest_checkpoint(path, verify=False)
        if newest is not None and (newest / "learner" / "model").is_dir():
            return newest, newest / "learner" / "model"
        raise ValueError(f"{path} is a run folder without a complete checkpoint")
    raise ValueError(
        f"{path} is not a checkpoint (no learner/model inside) nor a run folder (no "
        "checkpoints/ inside)"
    )


def evaluate(args: argparse.Namespace) -> int:
    """Score a checkpoint or the base model on ``data.val_path`` (issue #16); prints the
    summary as one JSON line and writes it to ``--out``. Exits 2, before Ray starts, for a
    checkpoint or dataset file that is not there, or a model that does not resolve."""
    from services.trainer.loop import Trainer
    from services.trainer.metrics import wilson_interval
    from services.trainer.reaper import start_reaper

    overrides = list(args.overrides)
    checkpoint = None
    if args.checkpoint:
        try:
            checkpoint, model = checkpoint_model(Path(args.checkpoint))
        except ValueError as exc:
            print(f"shuffle-r1 eval: {exc}", file=sys.stderr)
            return 2
        overrides.append(f"learner.model_path={model}")
    base = load_config(args.config, overrides)
    if not Path(base.data.val_path).is_file():
        print(f"shuffle-r1 eval: data.val_path={base.data.val_path} is not a file", file=sys.stderr)
        return 2
    if report_problems("shuffle-r1 eval", model_problems(base)):
        return 2
    check_reward_function(base)
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
    start_reaper()
    with Trainer(cfg, resume=False) as trainer:
        result = trainer.evaluate()
        problems = len(trainer.val_prompts)
    samples = int(result["val/samples"])
    low, high = wilson_interval(result["val/accuracy"], samples)
    summary = {
        "model": cfg.learner.model_path,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "val_path": cfg.data.val_path,
        "problems": problems,
        "samples": samples,
        "val_n": cfg.rollout.val_n,
        "val_temperature": cfg.rollout.val_temperature,
        "max_response_length": cfg.rollout.max_response_length,
        "accuracy": result["val/accuracy"],
        # over samples: with val_n > 1 a problem's samples are not independent, so the
        # interval is narrower than the problems alone support
        "accuracy_ci95": [low, high],
        "reward": result["val/reward"],
        "format": result["val/format"],
        "eval_s": result["time/eval_s"],
    }
    out = Path(args.out) if args.out else Path(cfg.trainer.output_dir) / "eval_summary.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise ``ConnectionError`` when ``address`` is ``host:port`` and nothing accepts a TCP
    connection there; other forms (``auto``, ``ray://...``) are left to ``ray.init``."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc.strerror or exc})") from exc


def scale(args: argparse.Namespace) -> int:
    """Ask a running job's rollout deployment for ``num_workers`` replicas. The bounds are the
    job's ``rollout.min_workers`` / ``max_workers`` (read from its weight store); a job whose
    rollout deployment autoscales refuses. Joining workers load the newest weights before
    their first request; leaving ones finish their requests first."""
    import os

    import ray
    from ray import serve

    from actors.rollout import check_scale
    from actors.serving import set_num_replicas, wait_for_replicas
    from actors.weights import weight_store_name

    os.environ.setdefault("RAY_AUTH_MODE", "token")  # as a local run starts Ray (init_ray)
    try:
        # ray.init retries an unreachable GCS for minutes: a host:port is tried first
        _check_reachable(args.address)
        ray.init(address=args.address, namespace=args.namespace, logging_level=logging.WARNING)
    except (OSError, RuntimeError, ValueError) as exc:  # OSError: ConnectionError, TimeoutError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"shuffle-r1 scale: cannot join the Ray cluster at --address={args.address}: "
              f"{first} (is the job running, and is this its head's address? `ray status "
              f"--address {args.address}` checks)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        stores = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == args.namespace and a["name"].endswith("-weights")
        ]
        if args.run:
            name = weight_store_name(args.run)
            if name not in stores:
                running = sorted(s.removesuffix("-weights") for s in stores)
                print(f"shuffle-r1 scale: no run {args.run!r} in namespace {args.namespace!r}; "
                      f"running: {running}", file=sys.stderr)  # fmt: skip
                return 2
        elif len(stores) == 1:
            name = stores[0]
        else:
            running = sorted(s.removesuffix("-weights") for s in stores)
            print(f"shuffle-r1 scale: {len(stores)} runs in namespace {args.namespace!r} "
                  f"({running}); name one with --run", file=sys.stderr)  # fmt: skip
            return 2
        store: Any = ray.get_actor(name, namespace=args.namespace)
        info: dict[str, Any] = ray.get(store.scaling.remote())
        try:
            check_scale(
                args.num_workers, info["min_workers"], info["max_workers"], info["autoscaling"]
            )
            set_num_replicas(info["app"], info["deployment"], args.num_workers)
        except ValueError as exc:
            print(f"shuffle-r1 scale: {exc}", file=sys.stderr)
            return 2
        print(f"{info['app']}: asked for {args.num_workers} rollout workers", flush=True)
        if args.wait:
            handle = serve.get_deployment_handle(info["deployment"], info["app"])
            wait_for_replicas(info["app"], info["deployment"], args.num_workers, args.wait, handle)
            print(f"{info['app']}: {args.num_workers} rollout workers running", flush=True)
        return 0
    finally:
        ray.shutdown()
