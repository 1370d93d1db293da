"""Experiment trackers beside ``metrics.jsonl``: TensorBoard, MLflow, Weights & Biases.

``trainer.loggers`` names them (README "Observability"). ``jsonl`` (``metrics.jsonl``, written
by :class:`~services.trainer.metrics.MetricsWriter`) is always one of them and stays the
record: ``--resume``, the run's summary and its plot read it. Every row written there also
goes to each tracker: a step's metrics (with the evaluation's ``val/`` keys on the steps that
evaluate) and the evaluation before training. A tracker's step is the number of training steps
done, the row's ``step`` + 1, so 0 is before training (as in the plot and the Prometheus
``shuffle_r1_trainer_step``).

- ``tensorboard``: event files in ``<output_dir>/tensorboard``
  (``torch.utils.tensorboard.SummaryWriter``; view with ``tensorboard --logdir``).
- ``mlflow``: a run named ``trainer.run_name`` in the experiment ``trainer.tracker_project``
  (default: the run name) at ``trainer.mlflow_tracking_uri``; by default a SQLite store,
  ``<output_dir>/mlflow.db`` (MLflow 3 keeps its plain file store in maintenance mode and
  refuses it unless told otherwise).
- ``wandb``: a run in the project ``trainer.tracker_project``; ``trainer.wandb_mode=offline``
  writes it under ``<output_dir>/wandb`` without the network (``wandb sync`` uploads it).

A library is imported only when its tracker is chosen; :func:`missing_packages` names the
chosen ones that are not installed, which the preflight refuses before anything starts. A
tracker that fails, when it opens or at a step (a full disk, a database error, a server that
is away), is logged once as a warning and dropped: training and ``metrics.jsonl`` go on.

``--resume`` continues the same tracker runs: TensorBoard purges the steps after the checkpoint
(``purge_step``) before they are trained again; MLflow reopens, and W&B resumes, the run whose
id ``<output_dir>/trackers.json`` holds. Neither of those two can take back the steps after the
checkpoint: MLflow shows both values of a re-trained step; W&B, by its documented rule, ignores
a step below the last one it has, so it keeps the first (not checked by the tests). Steps
trained again after a learner rebuild are logged again likewise. A fresh run starts new
tracker runs and empties ``<output_dir>/tensorboard``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from shuffle_r1.config import TrainerConfig

log = logging.getLogger(__name__)

IDS_FILE = "trackers.json"  # {tracker: run id} of the output folder's tracker runs
# tracker -> {module it imports: the pip package that has it}
_LIBRARIES = {
    "tensorboard": {"tensorboard": "tensorboard"},
    "mlflow": {"mlflow": "mlflow-skinny"},
    "wandb": {"wandb": "wandb"},
}
# what MLflow's SQL stores (the URI schemes below) import besides mlflow
_SQL_LIBRARIES = {"sqlalchemy": "sqlalchemy", "alembic": "alembic"}
_SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


class Tracker(Protocol):
    """One experiment tracker's run: ``run_id`` (None where the library has none to resume)."""

    run_id: str | None

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self, finished: bool) -> None: ...


def missing_packages(t: TrainerConfig) -> dict[str, str]:
    """``{tracker: "pip packages"}`` for each tracker in ``t.loggers`` whose library this Python
    cannot import (looked up, not imported); ``{}`` when all are there."""
    uri = t.mlflow_tracking_uri
    sql = not uri or uri.split(":", 1)[0].split("+", 1)[0] in _SQL_SCHEMES  # "" = SQLite
    missing = {}
    for name in t.loggers:
        needs = dict(_LIBRARIES.get(name, {}))
        if name == "mlflow" and sql:
            needs.update(_SQL_LIBRARIES)
        absent = [pkg for module, pkg in needs.items() if not _importable(module)]
        if absent:
            missing[name] = " ".join(absent)
    return missing


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class TensorBoardTracker:
    """Scalars into the event files of ``folder``; ``purge_step``: the first step written
    again (a resumed run), whose earlier events and those after it TensorBoard drops."""

    def __init__(self, folder: Path, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run_id: str | None = None  # the folder is the run
        if purge_step is None:  # a fresh run: the folder's earlier events are not its own
            shutil.rmtree(folder, ignore_errors=True)
        self.writer = SummaryWriter(str(folder), purge_step=purge_step)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self, finished: bool) -> None:
        self.writer.close()


class MlflowTracker:
    """A run of the experiment ``t.tracker_project`` (or ``t.run_name``) at
    ``t.mlflow_tracking_uri`` (or SQLite ``<out>/mlflow.db``): run ``run_id`` reopened, or a
    new one when it is None or not in the store."""

    def __init__(self, t: TrainerConfig, out: Path, run_id: str | None) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        default = not t.mlflow_tracking_uri
        uri = f"sqlite:///{(out / 'mlflow.db').resolve()}" if default else t.mlflow_tracking_uri
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException as exc:
                log.warning(
                    "mlflow: run %s is not in the store (%s); starting a new one",
                    run_id, exc.message,
                )  # fmt: skip
                run_id = None
        if run_id is None:
            name = t.tracker_project or t.run_name
            experiment = self.client.get_experiment_by_name(name)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:  # artifacts (none yet) beside the default store; a server chooses its own
                where = (out / "mlflow-artifacts").resolve().as_uri() if default else None
                experiment_id = self.client.create_experiment(name, artifact_location=where)
            run_id = self.client.create_run(experiment_id, run_name=t.run_name).info.run_id
        self.run_id: str | None = run_id

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None
        now_ms = int(time.time() * 1000)
        rows = [Metric(key, value, now_ms, step) for key, value in metrics.items()]
        self.client.log_batch(self.run_id, metrics=rows)

    def close(self, finished: bool) -> None:
        assert self.run_id is not None
        self.client.set_terminated(self.run_id, "FINISHED" if finished else "KILLED")


class WandbTracker:
    """A W&B run of the project ``t.tracker_project`` (or ``t.run_name``) in mode
    ``t.wandb_mode``, its files under ``<out>/wandb``; run ``run_id`` resumed, or a new id."""

    def __init__(self, t: TrainerConfig, out: Path, run_id: str | None) -> None:
        import wandb

        self.run = wandb.init(
            project=t.tracker_project or t.run_name,
            name=t.run_name,
            id=run_id or uuid.uuid4().hex[:12],
            resume="allow",
            dir=str(out),
            mode="online" if t.wandb_mode == "online" else "offline",  # as a Literal
        )
        self.run_id: str | None = self.run.id

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)


class Trackers:
    """The open trackers, fed together. One that raises is logged once and dropped."""

    def __init__(self, trackers: Mapping[str, Tracker]) -> None:
        self.open = dict(trackers)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Send a ``metrics.jsonl`` row (``name -> float``) at ``step`` training steps done."""
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        for name, tracker in list(self.open.items()):
            try:
                tracker.log(step, values)
            except Exception as exc:  # any library's failure: jsonl stays, training goes on
                log.warning(
                    "%s tracker failed at step %d (%s: %s); it gets no more metrics this run, "
                    "metrics.jsonl still has them all",
                    name, step, type(exc).__name__, exc,
                )  # fmt: skip
                del self.open[name]

    def close(self, finished: bool) -> None:
        """End each tracker run (``finished``: the run reached ``trainer.total_steps``)."""
        for name, tracker in list(self.open.items()):
            try:
                tracker.close(finished)
            except Exception as exc:  # closing: report and go on
                log.warning("%s tracker: closing it failed: %s", name, exc)
        self.open.clear()


def open_trackers(t: TrainerConfig, resume_from: int | None) -> Trackers:
    """Open the trackers of ``t.loggers`` besides jsonl for the run in ``t.output_dir``.

    ``resume_from``: the training steps done at the checkpoint a resumed run continues from
    (None: a fresh run). One that cannot open is logged and left out (:class:`Trackers`). The
    run ids go to ``<output_dir>/trackers.json`` for the next ``--resume``."""
    out = Path(t.output_dir)
    ids_path = out / IDS_FILE
    ids: dict[str, str] = {}
    if resume_from is None:  # a fresh run continues no earlier tracker run
        ids_path.unlink(missing_ok=True)
    elif ids_path.is_file():
        ids = json.loads(ids_path.read_text())
    opened: dict[str, Tracker] = {}
    for name in t.loggers:
        try:
            if name == "tensorboard":
                purge = None if resume_from is None else resume_from + 1
                opened[name] = TensorBoardTracker(out / "tensorboard", purge)
            elif name == "mlflow":
                opened[name] = MlflowTracker(t, out, ids.get(name))
            elif name == "wandb":
                opened[name] = WandbTracker(t, out, ids.get(name))
        except Exception as exc:  # as at a step: the run goes on without it
            log.warning(
                "%s tracker could not start (%s: %s); the run goes on without it, "
                "metrics.jsonl has every metric",
                name, type(exc).__name__, exc,
            )  # fmt: skip
    ids.update({name: tr.run_id for name, tr in opened.items() if tr.run_id is not None})
    if ids:
        out.mkdir(parents=True, exist_ok=True)
        ids_path.write_text(json.dumps(ids, indent=1) + "\n")
    return Trackers(opened)
