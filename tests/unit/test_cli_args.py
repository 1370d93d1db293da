"""`shuffle-r1`'s argument parsing (services.cli.parse): key=value overrides anywhere after
the command, in the order given; anything else unknown is refused, naming it."""

from __future__ import annotations

import pytest

from services.cli import parse


def test_overrides_around_options_are_all_kept_in_order() -> None:
    args = parse(["eval", "--config", "c.yaml", "a.b=1", "--checkpoint", "run", "data.val_path=f",
                  "data.val_size=3"])  # fmt: skip
    assert args.overrides == ["a.b=1", "data.val_path=f", "data.val_size=3"]
    assert args.checkpoint == "run" and args.config == "c.yaml"
    args = parse(["train", "--config", "c.yaml", "x.y=1", "--resume", "x.y=2"])
    assert args.overrides == ["x.y=1", "x.y=2"] and args.resume  # the later one wins at load


@pytest.mark.parametrize(
    ("argv", "unknown"),
    [(["eval", "--bogus"], "--bogus"), (["scale", "rollout", "2", "a.b=1"], "a.b=1"),
     (["train", "x.y=1", "--resume", "stray"], "stray")],
)  # fmt: skip
def test_anything_else_unknown_is_refused(
    argv: list[str], unknown: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {unknown}" in capsys.readouterr().err


def test_eval_takes_a_checkpoint_or_the_base_model_not_both(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert parse(["eval", "--base"]).base
    with pytest.raises(SystemExit):
        parse(["eval", "--base", "--checkpoint", "d"])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["train", "--config", "a.yaml", "--config", "b.yaml"],
     ["config", "--config=a.yaml", "x.y=1", "--config", "b.yaml"]],
)  # fmt: skip
def test_a_second_config_is_refused_not_silently_used(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(argv)
    assert exit_.value.code == 2
    assert "--config given more than once" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "verbose"),
    [(["-v", "config"], True), (["config", "-v"], True), (["train", "x.y=1", "--verbose"], True),
     (["buffer", "serve", "-v"], True), (["-v", "eval", "--base"], True), (["config"], False)],
)  # fmt: skip
def test_verbose_works_before_and_after_the_command(argv: list[str], verbose: bool) -> None:
    assert parse(argv).verbose is verbose


def test_help_lists_commands_examples_and_sections(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("config", "train", "eval", "scale", "buffer"):
        assert f"\n    {command} " in out  # one line each, with its description
    assert "examples:" in out and "shuffle-r1 config --list" in out
    assert "data, rollout, reward, algorithm, learner, buffer, trainer, cluster" in out
    assert "``" not in out  # no raw docstring markup
