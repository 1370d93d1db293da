"""Limits the services enforce, in one place, so a recipe is checked against them when it is
loaded (``shuffle_r1.config.validate``) and not minutes later by the service that refuses it.

The replay buffer (``services/replay_buffer``) imports these; nothing here imports a service.
"""

from __future__ import annotations

import re

# A run id names Redis keys, Ray actors and Serve applications: letters, digits, ``._-``.
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Steps and versions are exact integers in Redis's Lua (doubles): keep them well inside.
MAX_COUNTER = 10**12
# A group's prompt id (the dataset row's uid) in bytes of UTF-8.
MAX_PROMPT_ID_BYTES = 512
# ABS rounds per step: the paper uses 2-8. The bound keeps a request from making the server
# allocate per-round lists of billions of entries.
MAX_SHUFFLE_TIMES = 1024
# Rewards the buffer accepts: |reward| <= this. The built-in rewards are in [0, 1]; the
# bound leaves room for scaled rewards and keeps GRPO's z-score (float64, squares <= 1e12)
# far from overflow: a reward of 1e308 overflowed to NaN advantages.
MAX_ABS_REWARD = 1e6
# Log-probabilities are <= 0; the buffer accepts up to this much above 0, for the rounding
# of an inference engine's float32 log-softmax on a token of probability ~1.
MAX_LOGPROB = 1e-4
# gRPC message sizes are C ints: 2 GiB - 1 byte is the largest it accepts.
MAX_MESSAGE_MB = 2047
# The reward endpoint's request body, in KiB (reward.max_request_kb): a request carries one
# group's responses (tens of KiB); the bound keeps one POST from holding a replica for minutes.
MAX_REQUEST_KB = 64 * 1024
# Seconds: the reward endpoint's per-request deadline and a reward call's timeout at most.
MAX_REQUEST_TIMEOUT_S = 3600.0
# Error messages echo at most this many characters of what they were given.
MAX_ECHO_CHARS = 200


def cut(text: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters, with the full length said when it is cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"


def echo(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` cut to ``limit`` characters (with the full length said), for error
    messages that show the input they refuse without sending a megabyte back."""
    return cut(repr(value), limit)


# Seconds on top of reward.timeout_s before a reward call counts as hung (actors/reward.py).
REWARD_GRACE_S = 2.0

# PTS keeps M = floor(α·n/2) pairs (docs/algorithm.md §2.3); the floor adds this tolerance so
# that α = 1 - 0.9 (= 0.0999…98) does not lose a pair. Shared by the config's check at load
# and shuffle_r1.algos.pts.pairs_kept, so both count the same M.
PTS_FLOOR_TOLERANCE = 1e-9
