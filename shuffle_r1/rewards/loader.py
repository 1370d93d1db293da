"""Load a pluggable reward function named ``"package.module:function"`` (``reward.function``)."""

from __future__ import annotations

import pkgutil
import sys

from shuffle_r1.rewards.math import RewardFn


def load_reward_fn(path: str) -> RewardFn:
    """Import the reward function named ``"package.module:function"`` (``pkgutil.resolve_name``;
    the part after the colon may be dotted, ``module:Class.method``).

    The function takes a :class:`shuffle_r1.rewards.RewardInput`, or ``(response,
    reference_answer, accuracy_weight=..., format_weight=..., timeout_s=...)`` like
    :func:`shuffle_r1.rewards.math_reward` (:func:`shuffle_r1.rewards.takes_record` tells
    which), and returns a float, a dict of named scores or a
    :class:`shuffle_r1.rewards.RewardResult`.

    Raises:
        ValueError: naming ``path`` when it is malformed (no colon, a side that is not dotted
            Python names), its module cannot be imported, the module has no such attribute, or the
            attribute is not callable.
        Exception: whatever the module's own code raises while it is imported, as is.
    """
    module_name, sep, attr = path.partition(":")
    names = [*module_name.split("."), *attr.split(".")]
    if not sep or not all(name.isidentifier() for name in names):
        raise ValueError(
            f"reward function {path!r} must be 'module:function', "
            "e.g. 'shuffle_r1.rewards:math_reward'"
        )
    try:
        fn = pkgutil.resolve_name(path)
    except ImportError as exc:
        raise ValueError(
            f"reward function {path!r}: cannot import module {module_name!r}: {exc}"
        ) from exc
    except AttributeError as exc:
        if module_name not in sys.modules:  # raised by the module's own code while importing
            raise
        raise ValueError(
            f"reward function {path!r}: module {module_name!r} has no attribute {attr!r}"
        ) from exc
    if not callable(fn):
        raise ValueError(f"reward function {path!r} is a {type(fn).__name__}, not a callable")
    return fn
