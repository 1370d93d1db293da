"""What `shuffle-r1 train` checks before Ray starts (services.trainer.preflight): real files,
a real reward module, the real model resolver; and the command itself, run as a user runs
it, failing in one line per problem with exit 2 and no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from services.trainer.preflight import check_output_folder, earlier_run, preflight
from shuffle_r1.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "configs" / "tiny_cpu.yaml")


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A reward module on sys.path with one good and one wrongly shaped function."""
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def good(response, reference_answer, **kwargs):
                return float(response.strip() == reference_answer)

            def two_args_only(response, reference_answer):
                return 0.0

            def by_record(record):
                return {"exact": float(record.response == record.reference_answer)}

            def three_required(response, reference_answer, prompt):
                return 0.0
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards"


def keys(problems: list) -> list[str]:
    return [p.key for p in problems]


def test_the_tiny_recipe_passes(reward_module: str) -> None:
    cfg = load_config(TINY, [f"reward.function={reward_module}:good"])
    assert preflight(cfg) == []


def test_each_problem_is_one_line_naming_its_key(tmp_path: Path, reward_module: str) -> None:
    bad_rows = tmp_path / "rows.jsonl"
    bad_rows.write_text("\n".join(json.dumps({"q": f"{i}+1", "a": i + 1}) for i in range(3)))
    cfg = load_config(
        TINY,
        [
            f"learner.model_path={tmp_path / 'no-model'}",
            f"data.train_path={tmp_path / 'missing.jsonl'}",
            f"data.val_path={bad_rows}",  # exists, but its columns are q/a, not question/answer
            f"reward.function={reward_module}:two_args_only",
        ],
    )
    problems = preflight(cfg)
    assert keys(problems) == [
        "learner.model_path",
        "data.train_path",
        "data.val_path",
        "reward.function",
    ]
    text = [str(p) for p in problems]
    assert all("\n" not in line for line in text)
    assert "no-model" in text[0] and "config.json" in text[0]
    assert "missing.jsonl" in text[1] and "not found" in text[1]
    assert "gives no problems" in text[2] and "question" in text[2]
    assert "(response, reference_answer)" in text[3] and "**kwargs" in text[3]


def test_a_reward_module_that_does_not_import_is_reported(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["reward.function=json:no_such_function"])
    problems = preflight(cfg, check_model=False)
    assert keys(problems) == ["reward.function"]
    assert "no_such_function" in str(problems[0])


def test_reward_functions_are_each_checked_and_refused_in_one_line_naming_the_entry(
    reward_module: str,
) -> None:
    listed = (
        f"reward.functions=[{{function: '{reward_module}:by_record', weight: 0.5}}, "
        f"{{function: 'shuffle_r1.rewards:math_reward', weight: 1.0}}]"
    )
    assert preflight(load_config(TINY, [listed]), check_model=False) == []
    bad = listed.replace("shuffle_r1.rewards:math_reward", f"{reward_module}:three_required")
    problems = preflight(load_config(TINY, [bad]), check_model=False)
    assert keys(problems) == ["reward.functions[1].function"]
    assert "\n" not in str(problems[0]) and "takes neither one record" in str(problems[0])


def test_reward_function_lists_that_cannot_work_are_refused_at_load(reward_module: str) -> None:
    one = f"{{function: '{reward_module}:by_record', weight: 1.0}}"
    with pytest.raises(
        ConfigError, match=r"reward\.function='my_rewards:good' and reward\.functions"
    ):
        load_config(TINY, [f"reward.function={reward_module}:good", f"reward.functions=[{one}]"])
    with pytest.raises(
        ConfigError, match=r"^reward\.functions\[1\]\.function='nope:fn': no module"
    ):
        load_config(TINY, [f"reward.functions=[{one}, {{function: 'nope:fn'}}]"])
    with pytest.raises(ConfigError, match=r"^reward\.functions\[0\]\.weight=nan must be in"):
        load_config(TINY, [f"reward.functions=[{one.replace('1.0', 'nan')}]"])


def test_a_prompt_template_that_does_not_fit_the_rows_is_one_line(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["data.prompt_template='{{ probelm }}'"])
    [problem] = preflight(cfg, check_model=False)
    assert problem.key == "data.prompt_template" and "\n" not in str(problem)
    assert "'probelm' is undefined" in problem.message and "train.jsonl" in problem.message
    with pytest.raises(ConfigError, match=r"^data\.prompt_template: line 1: unexpected"):
        load_config(TINY, ["data.prompt_template='{{ problem '"])
    file = tmp_path / "p.jinja"
    file.write_text("Solve: {{ problem }}")
    assert (
        preflight(load_config(TINY, [f"data.prompt_template=file:{file}"]), check_model=False) == []
    )
    missing = preflight(load_config(TINY, ["data.prompt_template=file:nowhere.jinja"]), False)
    assert [str(p) for p in missing] == [
        "data.prompt_template: file:nowhere.jinja: cannot read the template file: [Errno 2] "
        "No such file or directory: 'nowhere.jinja'"
    ]


def test_an_earlier_run_is_refused_kept_on_resume_and_removed_on_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints" / "step_000002").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    (out / "config.yaml").write_text("kept: true\n")
    cfg = load_config(TINY, [f"trainer.output_dir={out}"])
    assert earlier_run(out) == ["metrics.jsonl", "checkpoints/ (1 entries)"]

    problem = check_output_folder(cfg, resume=False)
    assert problem is not None and problem.key == "trainer.output_dir"
    assert "--resume" in problem.message and "trainer.overwrite=true" in problem.message
    assert (out / "metrics.jsonl").exists()  # refused: nothing touched

    assert check_output_folder(cfg, resume=True) is None
    assert (out / "metrics.jsonl").exists()

    overwrite = load_config(TINY, [f"trainer.output_dir={out}", "trainer.overwrite=true"])
    assert check_output_folder(overwrite, resume=False) is None
    assert earlier_run(out) == [] and not (out / "checkpoints").exists()
    assert (out / "config.yaml").exists()  # only the run's logs and checkpoints go

    assert check_output_folder(cfg, resume=False) is None  # an empty folder is a fresh start


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_train_fails_before_ray_in_one_line_per_problem(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run_cli(
        "train",
        "--config",
        TINY,
        f"data.train_path={tmp_path / 'nope.jsonl'}",
        "reward.function=json:loads",  # imports, but json.loads cannot take the call
        f"trainer.output_dir={out}",
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("shuffle-r1 train: data.train_path: ")
    assert lines[1].startswith("shuffle-r1 train: reward.function: ")
    assert lines[-1] == "shuffle-r1 train: nothing was started (2 problem(s))"
    assert "Traceback" not in done.stderr
    assert not out.exists()  # refused before the run lock or Ray


def test_train_refuses_to_start_over_an_earlier_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    done = run_cli("train", "--config", TINY, f"trainer.output_dir={out}")
    assert done.returncode == 2, done.stderr
    assert "shuffle-r1 train: trainer.output_dir: " in done.stderr
    assert "Traceback" not in done.stderr
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_config_check_reports_or_confirms(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text("question,answer\n1+1,2\n")
    done = run_cli("config", "--check", "--config", TINY, f"data.val_path={tmp_path / 'x.csv'}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "shuffle-r1 config: 1 problem(s)"
    assert "data.val_path" in done.stderr and "unknown extension '.csv'" in done.stderr
    ok = run_cli("config", "--check", "--config", TINY)
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr.strip().splitlines()[-1].startswith("ok: model tiny-llama")
    assert "learner:" in ok.stdout  # and the resolved recipe, as without --check


def test_eval_of_a_model_that_does_not_resolve_is_one_line(tmp_path: Path) -> None:
    done = run_cli("eval", "--config", TINY, f"learner.model_path={tmp_path / 'no-model'}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("shuffle-r1 eval: learner.model_path: ")
    assert lines[-1] == "shuffle-r1 eval: nothing was started (1 problem(s))"


def test_scale_against_an_address_with_no_ray_is_one_line_not_a_traceback() -> None:
    import socket

    with socket.socket() as s:  # a loopback port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = run_cli("scale", "rollout", "2", "--address", f"127.0.0.1:{port}")
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"shuffle-r1 scale: cannot join the Ray cluster at --address=127.0.0.1:{port}"
    )
