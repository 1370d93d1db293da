"""One typed configuration tree for a run.

A recipe is a YAML file in ``configs/`` whose keys mirror the dataclasses of
:mod:`~shuffle_r1.config.schema`; the CLI applies ``key=value`` overrides on top
(``algorithm.shuffle_times=4``; :mod:`~shuffle_r1.config.recipe`). Everything is validated
when it is loaded (:mod:`~shuffle_r1.config.checks`): an unknown key, a value of the wrong
type or a value outside its allowed range raises :class:`ConfigError` naming the key, the
value and what is allowed.

Defaults are the paper's reference recipe (``docs/algorithm.md`` §7: Qwen2.5-VL-3B/7B
on Geometry3K/K12); the CPU recipes in ``configs/`` scale it down.
"""

from __future__ import annotations

from shuffle_r1.config.checks import check_reward_function, is_loopback, validate
from shuffle_r1.config.recipe import load_config, redact_url, redacted, save_config, to_yaml
from shuffle_r1.config.schema import (
    ABS_MINIBATCH_ORDERS,
    ALGORITHMS,
    BUFFER_TOKEN_ENV,
    KL_TYPES,
    LOGGERS,
    LOSS_AGG_MODES,
    RAY_AUTH_MODE_ENV,
    REDACTED,
    REPO_ROOT,
    REWARD_TOKEN_ENV,
    SECTIONS,
    TRAINER_MODES,
    WANDB_MODES,
    AlgorithmConfig,
    BufferConfig,
    ClusterConfig,
    Config,
    ConfigError,
    DataConfig,
    LearnerConfig,
    RewardConfig,
    RolloutConfig,
    TrainerConfig,
)

__all__ = [
    "ABS_MINIBATCH_ORDERS",
    "ALGORITHMS",
    "BUFFER_TOKEN_ENV",
    "KL_TYPES",
    "LOGGERS",
    "LOSS_AGG_MODES",
    "RAY_AUTH_MODE_ENV",
    "REDACTED",
    "REPO_ROOT",
    "REWARD_TOKEN_ENV",
    "SECTIONS",
    "TRAINER_MODES",
    "WANDB_MODES",
    "AlgorithmConfig",
    "BufferConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "LearnerConfig",
    "RewardConfig",
    "RolloutConfig",
    "TrainerConfig",
    "check_reward_function",
    "is_loopback",
    "load_config",
    "redact_url",
    "redacted",
    "save_config",
    "to_yaml",
    "validate",
]
