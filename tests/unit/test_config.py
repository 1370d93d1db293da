"""The config tree: recipes load, overrides apply, bad values fail naming the key."""

import subprocess
import sys
from pathlib import Path

import pytest

from shuffle_r1.algos import pairs_kept
from shuffle_r1.config import (
    Config,
    ConfigError,
    check_reward_function,
    load_config,
    save_config,
)
from shuffle_r1.limits import MAX_ECHO_CHARS

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))


def test_defaults_are_the_paper_recipe() -> None:
    cfg = load_config()
    assert (cfg.rollout.n, cfg.rollout.temperature, cfg.rollout.top_p) == (16, 1.0, 0.99)
    assert (cfg.trainer.rollout_batch_size, cfg.learner.global_batch_size) == (512, 128)
    assert (cfg.data.max_prompt_length, cfg.rollout.max_response_length) == (2048, 2048)
    assert (cfg.learner.lr, cfg.learner.weight_decay, cfg.learner.grad_clip) == (1e-6, 1e-2, 1.0)
    assert (cfg.learner.ppo_epochs, cfg.learner.micro_batch_size) == (1, 4)
    assert (cfg.algorithm.keep_ratio, cfg.algorithm.shuffle_times) == (0.5, 8)
    assert (cfg.algorithm.clip_ratio_low, cfg.algorithm.clip_ratio_high) == (0.2, 0.2)
    assert cfg.algorithm.kl_coef == 0.0 and cfg.algorithm.loss_agg_mode == "token-mean"
    assert cfg.algorithm.behaviour_imp_cap == 5.0  # off-policy rollouts only (§4)
    assert (cfg.reward.accuracy_weight, cfg.reward.format_weight) == (0.9, 0.1)
    assert cfg.algorithm.name == "shuffle_r1" and cfg.learner.freeze_vision_tower
    assert (cfg.trainer.total_steps, cfg.trainer.eval_every) == (80, 5)
    assert (cfg.rollout.val_temperature, cfg.rollout.val_n) == (0.5, 8)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads(recipe: Path) -> None:
    assert isinstance(load_config(recipe), Config)


def test_overrides_apply_in_order() -> None:
    cfg = load_config(
        ROOT / "configs" / "tiny_cpu.yaml",
        ["algorithm.shuffle_times=4", "rollout.n=6", "algorithm.shuffle_times=3"],
    )
    assert cfg.algorithm.shuffle_times == 3 and cfg.rollout.n == 6


@pytest.mark.parametrize(
    ("name", "keep", "shuffle", "uses_pts"),
    [("grpo", 1.0, 1, False), ("grpo+pts", 0.5, 1, True), ("shuffle_r1", 0.5, 8, True)],
)
def test_algorithm_name_selects_pts_and_abs(
    name: str, keep: float, shuffle: int, uses_pts: bool
) -> None:
    a = load_config(None, [f"algorithm.name={name}"]).algorithm
    assert (a.effective_keep_ratio, a.effective_shuffle_times, a.uses_pts) == (
        keep,
        shuffle,
        uses_pts,
    )


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("algorithm.name=ppo", "algorithm.name='ppo'"),
        ("trainer.total_steps=abc", "trainer.total_steps"),
        ("rollout.bogus=1", "rollout.bogus"),
        ("nosuchsection.x=1", "nosuchsection"),
        ("rollout.n=7", "rollout.n=7"),
        ("algorithm.keep_ratio=0", "algorithm.keep_ratio"),
        ("algorithm.keep_ratio=0.1", "keeps no pair"),
        ("algorithm.kl_coef=-0.01", "algorithm.kl_coef=-0.01 must be >= 0"),
        ("algorithm.kl_type=k4", "algorithm.kl_type='k4' is not allowed"),
        ("algorithm.behaviour_imp_cap=0.5", "algorithm.behaviour_imp_cap=0.5 must be a finite"),
        ("algorithm.behaviour_imp_cap=.inf", "algorithm.behaviour_imp_cap=inf must be a finite"),
        ("algorithm.behaviour_imp_cap=.nan", "algorithm.behaviour_imp_cap=nan must be a finite"),
        ("learner.lora_rank=-1", "learner.lora_rank=-1 must be >= 0"),
        ("learner.lora_rank=8|learner.lora_alpha=0", "learner.lora_alpha=0"),
        ("learner.lora_rank=8|learner.lora_target_modules=[]", "learner.lora_target_modules"),
        ("learner.lora_rank=8|learner.backend=deepspeed", "LoRA is not implemented for"),
        (
            "algorithm.kl_coef=0.1|learner.backend=deepspeed|learner.zero_stage=3",
            "needs learner.zero_stage <= 2",
        ),
        ("rollout.top_p=1.5", "rollout.top_p"),
        ("learner.backend=megatron", "learner.backend"),
        ("learner.micro_batch_size=3", "learner.micro_batch_size"),
        ("buffer.port=70000", "buffer.port"),
        ("buffer.tls_cert=/x.pem", "tls_key"),
        ("reward.function=not_a_path", "reward.function"),
        ("rollout.max_workers=0", "max_workers"),
        ("data.train_size=-1", "data.train_size"),
        ("just-a-word", "section.key=value"),
        # issue #20 finding 10: accepted at load, refused minutes later by a service
        ("trainer.run_name=my run", "trainer.run_name='my run' must match"),
        ("trainer.run_name=-x", "trainer.run_name='-x' must match"),
        ("algorithm.shuffle_times=2000", "algorithm.shuffle_times=2000 must be in [1, 1024]"),
        ("buffer.max_message_mb=4096", "buffer.max_message_mb=4096 must be in [1, 2047]"),
        ("trainer.total_steps=1000000000000", "trainer.total_steps"),
        ("buffer.max_staleness=1000000000000", "buffer.max_staleness"),
        ("trainer.mode=overlap", "trainer.mode='overlap' is not allowed"),
        ("trainer.mode=async", "trainer.mode=async needs buffer.max_staleness >= 1 (got 0)"),
        (
            "trainer.mode=async|buffer.max_staleness=2|buffer.keep_steps=2",
            "set buffer.keep_steps=3 or more",
        ),
        ("reward.accuracy_weight=2e6", "reward.accuracy_weight + reward.format_weight"),
        ("reward.function=no_such_module_x:fn", "no module 'no_such_module_x'"),
        ("reward.function=shuffle_r1.rewards.nope:fn", "no module 'shuffle_r1.rewards.nope'"),
        (
            "reward.function=shuffle_r1.rewards:math-reward",
            "must be a Python path 'module:function'",
        ),
        ("reward.function=json.decoder.x:y", "no module 'json.decoder.x'"),
    ],
)
def test_bad_values_name_the_key(override: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, override.split("|"))  # "a=1|b=2": two overrides
    assert fragment in str(info.value)


def test_the_config_counts_pts_pairs_as_pts_does() -> None:
    """α = 1 - 0.9 is 0.0999…98: α·n/2 at n = 20 is just under 1, which PTS rounds to the
    one pair it keeps (``pairs_kept``); the config's check at load must agree."""
    alpha = 1 - 0.9
    assert alpha * 20 / 2 < 1 and pairs_kept(20, alpha) == 1
    cfg = load_config(None, ["rollout.n=20", f"algorithm.keep_ratio={alpha!r}"])
    assert cfg.algorithm.keep_ratio == alpha
    with pytest.raises(ConfigError, match="keeps no pair"):  # one step lower: truly none
        load_config(None, ["rollout.n=18", f"algorithm.keep_ratio={alpha!r}"])


def test_async_mode_loads_with_a_staleness_bound_the_buffer_can_hold() -> None:
    cfg = load_config(None, ["trainer.mode=async", "buffer.max_staleness=1"])
    assert (cfg.trainer.mode, cfg.buffer.max_staleness, cfg.buffer.keep_steps) == ("async", 1, 2)
    assert load_config(None, []).trainer.mode == "sync"  # the paper's recipe stays the default


def test_the_largest_allowed_values_load() -> None:
    cfg = load_config(None, ["algorithm.shuffle_times=1024", "buffer.max_message_mb=2047",
                             "trainer.run_name=" + "r" * 128])  # fmt: skip
    assert (cfg.algorithm.shuffle_times, cfg.buffer.max_message_mb) == (1024, 2047)


def test_an_importance_weight_cap_of_one_loads() -> None:
    """The smallest cap: every off-policy token weighs at most 1 (§4)."""
    assert load_config(None, ["algorithm.behaviour_imp_cap=1"]).algorithm.behaviour_imp_cap == 1


def test_an_echoed_value_is_cut() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["trainer.run_name=" + "x y" * 100_000])
    assert len(str(info.value)) < MAX_ECHO_CHARS + 400
    assert "(300002 chars)" in str(info.value)


def test_reward_module_is_found_without_running_it(tmp_path: Path, monkeypatch) -> None:
    """load_config finds the module (here a namespace package of the repository, which the
    reward workers import from) but does not import it; check_reward_function imports it."""
    # an earlier test of this process may have imported it (the preflight does); the
    # monkeypatch puts it back afterwards
    monkeypatch.delitem(sys.modules, "tests.e2e.reward_fns", raising=False)
    cfg = load_config(None, ["reward.function=tests.e2e.reward_fns:distinct_char_share"])
    assert "tests.e2e.reward_fns" not in sys.modules
    check_reward_function(cfg)
    pkg = tmp_path / "broken_reward_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('the import itself fails')\n")
    (pkg / "fine.py").write_text("NOT_CALLABLE = 3\ndef fn(*a, **k):\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(None, ["reward.function=broken_reward_pkg.fine:fn"])  # nothing ran
    assert "broken_reward_pkg" not in sys.modules
    with pytest.raises(ConfigError, match="raised RuntimeError: the import itself fails") as info:
        check_reward_function(cfg)
    assert "reward.function='broken_reward_pkg.fine:fn'" in str(info.value)
    for function, says in [
        ("tests.e2e.reward_fns:nope", "has no attribute 'nope'"),
        ("shuffle_r1.limits:MAX_COUNTER", "not a callable"),
    ]:
        with pytest.raises(ConfigError, match=says):
            check_reward_function(load_config(None, [f"reward.function={function}"]))


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


_TEN = lambda name: "[" + ", ".join([f"*{name}"] * 10) + "]"  # noqa: E731
LAUGHS = f"a: &a [0,0,0,0,0,0,0,0,0,0]\nb: &b {_TEN('a')}\nc: &c {_TEN('b')}\nd: {_TEN('c')}\n"


@pytest.mark.parametrize(
    ("text", "says"),
    [("- rollout\n- learner\n", "it holds a list of 2 items"),
     (LAUGHS, "not valid YAML"),  # OmegaConf refuses to expand 10^4 nodes of aliases
     ("- &a [1, 2]\n- [*a, *a]\n", "it holds a list of 2 items"),
     ("5\n", "it holds the value 5"),
     ("just words\n", "it holds the value 'just words'"),
     ("rollout: 5\n", "section 'rollout' must be a mapping of its keys"),
     ("rollout:\n", "section 'rollout' must be a mapping of its keys"),
     (b"\xff\xfe\x00", "cannot be read")],
)  # fmt: skip
def test_a_file_that_is_not_a_mapping_of_sections(tmp_path: Path, text, says: str) -> None:
    """Issue #20 finding 10: a YAML list was a TypeError deep in OmegaConf."""
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert says in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("text", ["", "# a comment\n", "null\n", "---\n"])
def test_an_empty_file_overrides_nothing(tmp_path: Path, text: str) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    assert load_config(path, ["rollout.n=4"]) == load_config(None, ["rollout.n=4"])


def test_save_and_reload_round_trip(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml", ["algorithm.name=grpo+pts"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg


def test_cli_prints_resolved_config_and_reports_errors() -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "services.cli", "config", "--config", "configs/tiny_cpu.yaml",
         "rollout.n=8"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "'n': 8" in ok.stdout and "model_path: tiny-llama" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "services.cli", "config", "rollout.temperature=hot"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "rollout.temperature" in bad.stderr


def test_cli_reports_a_list_file_without_a_traceback(tmp_path: Path) -> None:
    """Issue #20 finding 10: `shuffle-r1 config --config bad.yaml` with a YAML list."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("- rollout.n=4\n- learner.lr=1e-5\n")
    run = subprocess.run(
        [sys.executable, "-m", "services.cli", "config", "--config", str(bad)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr and run.stdout == ""
    assert f"config error: config file '{bad}' must be a mapping of sections" in run.stderr


@pytest.mark.parametrize("recipe", ["geo3k_qwen2_5_vl_3b.yaml", "k12_qwen2_5_vl_7b.yaml"])
def test_gpu_vl_recipes_carry_the_papers_hyperparameters(recipe: str) -> None:
    """docs/algorithm.md §7, typed out here rather than read from the defaults."""
    cfg = load_config(ROOT / "configs" / recipe)
    r, le, a, d, t = cfg.rollout, cfg.learner, cfg.algorithm, cfg.data, cfg.trainer
    assert (r.n, r.temperature, r.top_p, r.engine) == (16, 1.0, 0.99, "vllm")
    assert (t.rollout_batch_size, le.global_batch_size, le.micro_batch_size) == (512, 128, 4)
    assert (d.max_prompt_length, r.max_response_length) == (2048, 2048)
    assert (le.lr, le.weight_decay, le.grad_clip, le.ppo_epochs) == (1e-6, 1e-2, 1.0, 1)
    assert (a.name, a.keep_ratio, a.shuffle_times, a.kl_coef) == ("shuffle_r1", 0.5, 8, 0.0)
    assert le.freeze_vision_tower and (d.min_pixels, d.max_pixels) == (512**2, 2048**2)
    assert (t.total_steps, t.eval_every, r.val_temperature, r.val_n) == (80, 5, 0.5, 8)
    assert cfg.reward.function == "shuffle_r1.rewards:math_reward"
    assert (r.num_gpus_per_worker, le.num_gpus_per_rank) == (1, 1)
    assert r.num_workers + le.num_ranks == 8


def test_an_override_yaml_cannot_read_is_a_one_line_config_error() -> None:
    """``@`` cannot start a YAML value: the override fails as a ConfigError naming it (it was
    a yaml ScannerError traceback); quoted, the value loads."""
    with pytest.raises(ConfigError, match=r"could not parse overrides \['data.prompt_template=@x'\]"
                       ) as caught:  # fmt: skip
        load_config(None, ["data.prompt_template=@x"])
    assert "\n" not in str(caught.value)
    assert load_config(None, ["data.prompt_template='@x {{ problem }}'"]).data.prompt_template == (
        "@x {{ problem }}"
    )
