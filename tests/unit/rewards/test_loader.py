"""Loading a reward function by its ``module:function`` path, and the errors that name it."""

from __future__ import annotations

import pytest

from shuffle_r1.rewards import RewardResult, format_reward, load_reward_fn, math_reward


def test_load_reward_fn() -> None:
    assert load_reward_fn("shuffle_r1.rewards:math_reward") is math_reward
    assert load_reward_fn("shuffle_r1.rewards.math:format_reward") is format_reward
    # pkgutil.resolve_name: a dotted attribute after the colon
    assert load_reward_fn("shuffle_r1.rewards:RewardResult.__init__") is RewardResult.__init__


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("shuffle_r1.rewards.math_reward", "must be 'module:function'"),
        (":math_reward", "must be 'module:function'"),
        ("shuffle_r1.rewards:", "must be 'module:function'"),
        ("shuffle_r1.rewards:math-reward", "must be 'module:function'"),
        ("shuffle_r1.no_such_module:fn", "cannot import module 'shuffle_r1.no_such_module'"),
        ("shuffle_r1.rewards:no_such_fn", "has no attribute 'no_such_fn'"),
        ("shuffle_r1.rewards.math:FORMAT_PATTERN", "not a callable"),
    ],
)
def test_load_reward_fn_errors(path: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        load_reward_fn(path)
    assert repr(path) in str(info.value)


def test_what_the_module_raises_while_imported_is_raised_as_is() -> None:
    with pytest.raises(AttributeError, match="fails on purpose while it is imported"):
        load_reward_fn("tests.unit.rewards.raises_on_import:fn")
