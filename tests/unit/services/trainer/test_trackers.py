"""The experiment trackers of ``trainer.loggers`` (services.trainer.trackers), each real: the
rows metrics.jsonl gets are read back from a TensorBoard event file (TensorBoard's own reader),
an MLflow SQLite store (MlflowClient) and a W&B offline run folder; a resumed run continues
the same tracker runs; a tracker that fails is dropped while metrics.jsonl keeps every row; a
missing library and a bad ``trainer.loggers`` are refused before anything starts."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest

from services.trainer.metrics import MetricsWriter, read_metrics
from services.trainer.preflight import preflight
from services.trainer.trackers import IDS_FILE, Trackers, missing_packages, open_trackers
from shuffle_r1.config import ConfigError, TrainerConfig, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[4]


def trainer_cfg(out: Path, *overrides: str) -> TrainerConfig:
    cfg = load_config(None, [f"trainer.output_dir={out}", *overrides])
    return cfg.trainer


def step_row(step: int, seed: float) -> dict[str, float]:
    """A step's metrics as the trainer writes them; every second step also evaluates."""
    row = {"reward/mean": seed + step / 10, "learner/policy_loss": -seed * step}
    row["weight_version"] = float(step + 1)
    if step % 2:
        row["val/accuracy"] = seed / (step + 1)
    return row


def record(writer: MetricsWriter, trackers: Trackers, step: int, row: dict[str, float]) -> None:
    """What Trainer._record does: the jsonl row, then the trackers at steps done."""
    writer.write(step, row)
    trackers.log(step + 1, row)


def train(t: TrainerConfig, steps: range, seed: float, resume_from: int | None) -> None:
    """Write the rows of ``steps`` (-1: the evaluation before training) as a run would."""
    trackers = open_trackers(t, resume_from)
    writer = MetricsWriter(Path(t.output_dir) / "metrics.jsonl")
    for step in steps:
        row = {"val/accuracy": 0.125} if step < 0 else step_row(step, seed)
        record(writer, trackers, step, row)
    trackers.close(finished=steps.stop >= t.total_steps)


def jsonl_curve(out: Path, key: str) -> list[tuple[int, float]]:
    """(training steps done, value) of ``key`` in metrics.jsonl, the last row of a step."""
    return [(r["step"] + 1, r[key]) for r in read_metrics(out / "metrics.jsonl") if key in r]


def run_and_resume(t: TrainerConfig) -> None:
    """Steps -1..3, interrupted; resumed from the checkpoint at 2 steps done, which trains
    steps 2..4 again with other values (the jsonl keeps the last row of each)."""
    train(t, range(-1, 4), seed=1.0, resume_from=None)
    train(t, range(2, 5), seed=2.0, resume_from=2)


def test_tensorboard_reads_back_every_row_and_a_resume_purges_the_steps_trained_again(
    tmp_path: Path,
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = trainer_cfg(tmp_path, "trainer.loggers=[jsonl,tensorboard]", "trainer.total_steps=5")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.0.old").write_bytes(b"an earlier run's")
    run_and_resume(t)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert not (tmp_path / "tensorboard" / "events.out.tfevents.0.old").exists()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    for key in ("reward/mean", "learner/policy_loss", "weight_version", "val/accuracy"):
        expected = jsonl_curve(tmp_path, key)
        assert [e.step for e in events.Scalars(key)] == [step for step, _ in expected], key
        assert [e.value for e in events.Scalars(key)] == pytest.approx([v for _, v in expected])
    # steps done 0..5; evaluations before training and after steps 2 and 4 (re-trained)
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2, 3, 4, 5]
    assert [e.step for e in events.Scalars("val/accuracy")] == [0, 2, 4]
    assert events.Scalars("reward/mean")[2].value == pytest.approx(2.2)  # the resumed run's


@pytest.mark.slow  # an MLflow SQLite store opened 3 times: 4 s on 2 idle cores
def test_mlflow_reads_back_every_row_in_one_run_that_the_resume_reopens(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    t = trainer_cfg(tmp_path, "trainer.loggers=[jsonl,mlflow]", "trainer.total_steps=5",
                    "trainer.run_name=add2-a", "trainer.tracker_project=add2")  # fmt: skip
    train(t, range(-1, 4), seed=1.0, resume_from=None)
    run_id = json.loads((tmp_path / IDS_FILE).read_text())["mlflow"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(run_id).info.status == "KILLED"  # stopped before total_steps
    train(t, range(2, 5), seed=2.0, resume_from=2)
    assert json.loads((tmp_path / IDS_FILE).read_text())["mlflow"] == run_id

    experiment = client.get_experiment_by_name("add2")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "add2-a"
    for key in ("reward/mean", "learner/policy_loss", "weight_version", "val/accuracy"):
        history = {(m.step, m.value) for m in client.get_metric_history(run_id, key)}
        expected = jsonl_curve(tmp_path, key)
        # MLflow also keeps the first run's values of the steps the resume trained again
        stale = {(s + 1, step_row(s, 1.0)[key]) for s in (2, 3) if key in step_row(s, 1.0)}
        assert history == set(expected) | stale, key
        assert run.data.metrics[key] == expected[-1][1], key  # the newest value of the last

    # a fresh run in the same folder is a new MLflow run of the experiment
    train(t, range(0, 1), seed=3.0, resume_from=None)
    fresh = json.loads((tmp_path / IDS_FILE).read_text())["mlflow"]
    assert fresh != run_id
    assert {r.info.run_id for r in client.search_runs([experiment.experiment_id])} == {
        run_id,
        fresh,
    }


def test_a_failing_tracker_is_dropped_with_one_warning_and_the_rest_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = trainer_cfg(tmp_path, "trainer.loggers=[jsonl,mlflow,tensorboard]")
    trackers = open_trackers(t, None)
    writer = MetricsWriter(tmp_path / "metrics.jsonl")
    record(writer, trackers, 0, step_row(0, 1.0))
    run_id = json.loads((tmp_path / IDS_FILE).read_text())["mlflow"]
    # another client deletes the run: MLflow refuses to log to it from then on
    MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").delete_run(run_id)
    with caplog.at_level(logging.WARNING, logger="services.trainer.trackers"):
        for step in (1, 2, 3):
            record(writer, trackers, step, step_row(step, 1.0))
    warned = [r.getMessage() for r in caplog.records if r.name == "services.trainer.trackers"]
    assert len(warned) == 1 and warned[0].startswith("mlflow tracker failed at step 2 (")
    assert list(trackers.open) == ["tensorboard"]
    trackers.close(finished=True)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2, 3, 4]


def test_a_tracker_that_cannot_start_is_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "tensorboard").write_text("a file where the event folder goes")
    t = trainer_cfg(tmp_path, "trainer.loggers=[jsonl,tensorboard]")
    with caplog.at_level(logging.WARNING, logger="services.trainer.trackers"):
        trackers = open_trackers(t, None)
    assert trackers.open == {}
    assert "tensorboard tracker could not start (" in caplog.text
    trackers.log(1, {"reward/mean": 1.0})  # nothing to send to, nothing raised
    trackers.close(finished=True)


@pytest.mark.slow  # W&B starts its service process twice: 4 s on 2 idle cores
def test_wandb_offline_writes_its_run_folder_and_a_resume_keeps_the_run_id(tmp_path: Path) -> None:
    t = trainer_cfg(tmp_path, "trainer.loggers=[jsonl,wandb]", "trainer.total_steps=5")
    run_and_resume(t)
    run_id = json.loads((tmp_path / IDS_FILE).read_text())["wandb"]
    folders = sorted((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert 1 <= len(folders) <= 2  # one a start; both starts may fall in the same second
    logs = [f.read_bytes() for folder in folders for f in folder.glob(f"run-{run_id}.wandb")]
    assert logs and all(b"reward/mean" in data and b"val/accuracy" in data for data in logs)


def test_a_missing_library_is_refused_before_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    t = trainer_cfg(tmp_path, "trainer.loggers=[jsonl,tensorboard,mlflow,wandb]")
    assert missing_packages(t) == {}
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    assert missing_packages(t) == {"mlflow": "sqlalchemy", "wandb": "wandb"}
    served = trainer_cfg(tmp_path, "trainer.loggers=[jsonl,mlflow]",
                         "trainer.mlflow_tracking_uri=http://127.0.0.1:5000")  # fmt: skip
    assert missing_packages(served) == {}  # a tracking server needs no SQL store here
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml",
                      ["trainer.loggers=[jsonl,wandb]",
                       "reward.function=tests.e2e.reward_fns:distinct_char_share"])  # fmt: skip
    problems = [str(p) for p in preflight(cfg, check_model=False)]
    assert problems == [
        "trainer.loggers: wandb needs wandb, which this Python does not have: pip install wandb "
        "(the versions in requirements/pins.txt), or leave wandb out"
    ]


@pytest.mark.parametrize(
    ("value", "said"),
    [
        ("[tensorboard]", "must include 'jsonl'"),
        ("[jsonl,tb]", "'tb' is not a logger; choose from ['jsonl', 'tensorboard', 'mlflow', "),
        ("[jsonl,mlflow,mlflow]", "names a logger twice"),
        ("jsonl", "not a ListConfig"),
    ],
)
def test_a_bad_loggers_list_is_refused_at_load(value: str, said: str) -> None:
    with pytest.raises(ConfigError, match=r"trainer\.loggers") as refused:
        load_config(None, [f"trainer.loggers={value}"])
    assert said in str(refused.value)


def test_a_bad_wandb_mode_is_refused_and_the_mlflow_password_is_not_saved() -> None:
    with pytest.raises(ConfigError, match=r"trainer\.wandb_mode='cloud' is not allowed"):
        load_config(None, ["trainer.wandb_mode=cloud"])
    cfg: Any = load_config(None, ["trainer.mlflow_tracking_uri=https://me:s3cret@mlflow.example"])
    assert "s3cret" not in to_yaml(cfg) and "https://***@mlflow.example" in to_yaml(cfg)
