"""The rules a configuration must satisfy, checked when it is loaded (:func:`validate`):
ranges, choices, the services' limits (``shuffle_r1.limits``), the security rules
(README "Security") and that the reward function can be imported."""

from __future__ import annotations

import importlib.util
import inspect
import ipaddress
import math
import os
import pkgutil
import sys
from collections.abc import Sequence
from typing import Any

from shuffle_r1.config.schema import (
    ABS_MINIBATCH_ORDERS,
    ALGORITHMS,
    BUFFER_TOKEN_ENV,
    DEFAULT_REWARD_FUNCTION,
    KL_TYPES,
    LOGGERS,
    LOSS_AGG_MODES,
    RAY_AUTH_MODE_ENV,
    REPO_ROOT,
    REWARD_TOKEN_ENV,
    TRAINER_MODES,
    WANDB_MODES,
    Config,
    ConfigError,
)
from shuffle_r1.limits import (
    MAX_ABS_REWARD,
    MAX_COUNTER,
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


def _check_reward_path(key: str, value: str) -> None:
    module, _, attr = value.partition(":")
    names = module.split(".")
    if not attr.isidentifier() or not all(n.isidentifier() for n in names):
        raise ConfigError(
            f"{key}={echo(value)} must be a Python path 'module:function', "
            "e.g. 'shuffle_r1.rewards:math_reward'"
        )
    missing = _missing_module(module)
    if missing is not None:
        raise ConfigError(
            f"{key}={echo(value)}: no module {missing!r} on this Python's path "
            f"(sys.path) or in the repository ({REPO_ROOT}), where the reward workers import "
            "from; check the name, or install the module"
        )


def check_reward_function(cfg: Config) -> None:
    """Import each reward function (``reward.function``, or every entry of
    ``reward.functions``) and check that it names a callable that takes the call the reward
    workers make: ``fn(record)`` for one that takes a record
    (:func:`shuffle_r1.rewards.takes_record`), else ``fn(response, reference_answer,
    accuracy_weight=..., format_weight=..., timeout_s=...)``.

    This runs the module's code, so :func:`load_config` only checks that the module can be
    found; the trainer calls this before it starts Ray, so that a reward function that does
    not import fails at once and here, not in a Serve replica's log. The module is imported
    from ``sys.path`` and :data:`REPO_ROOT`, as the reward workers import it.

    Raises:
        ConfigError: starting ``<key>=<value>:`` (``reward.function`` or
            ``reward.functions[i].function``), naming the module and what went wrong (the
            import error, a missing attribute, an attribute that is not callable, a signature
            that cannot take that call).
    """
    for key, value, _ in cfg.reward.weighted_functions():
        _check_one_reward_function(cfg, key, value)


def _check_one_reward_function(cfg: Config, key: str, value: str) -> None:
    from shuffle_r1.rewards import load_reward_fn, takes_record

    added = REPO_ROOT not in sys.path
    if added:  # import it as the reward workers will
        sys.path.append(REPO_ROOT)
    try:
        fn = load_reward_fn(value)
    except ValueError as exc:  # malformed, not importable, no such attribute, not callable
        raise ConfigError(f"{key}={echo(value)}: {cut(str(exc), 1000)}") from exc
    except Exception as exc:  # the module's own code may raise anything while imported
        module = value.partition(":")[0]
        raise ConfigError(
            f"{key}={echo(value)}: importing module {module!r} raised "
            f"{type(exc).__name__}: {cut(str(exc), 1000)}"
        ) from exc
    finally:
        if added:
            sys.path.remove(REPO_ROOT)
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or extension function: nothing to check
        return
    if takes_record(fn):  # one required positional parameter: fn(record) always binds
        return
    r = cfg.reward
    try:  # as the reward workers call it (shuffle_r1.rewards.call_reward)
        signature.bind(
            "response",
            "reference answer",
            accuracy_weight=r.accuracy_weight,
            format_weight=r.format_weight,
            timeout_s=r.timeout_s,
        )
    except TypeError as exc:
        raise ConfigError(
            f"{key}={echo(value)}: its signature {signature} takes neither one record "
            "(fn(record: shuffle_r1.rewards.RewardInput)) nor the call fn(response, "
            "reference_answer, accuracy_weight=..., format_weight=..., timeout_s=...) the "
            f"reward workers make ({exc}); add **kwargs to ignore the keywords it does not use"
        ) from None


def _check_loggers(loggers: Sequence[str]) -> None:
    for name in loggers:
        if name not in LOGGERS:
            raise ConfigError(
                f"trainer.loggers={echo(list(loggers))}: {echo(name)} is not a logger; choose "
                f"from {list(LOGGERS)}"
            )
    if len(set(loggers)) < len(loggers):
        raise ConfigError(f"trainer.loggers={echo(list(loggers))} names a logger twice")
    if "jsonl" not in loggers:
        raise ConfigError(
            f"trainer.loggers={echo(list(loggers))} must include 'jsonl': metrics.jsonl is what "
            "--resume, the run's summary and its plot read; e.g. "
            f"trainer.loggers=[jsonl,{','.join(loggers)}]"
        )


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
    if d.prompt_template:  # its syntax is checked here; a file is read by the preflight
        from shuffle_r1.data.prompt import FILE_PREFIX, load_prompt_template

        if not d.prompt_template.startswith(FILE_PREFIX):
            try:
                load_prompt_template(d.prompt_template)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc

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
    if rw.functions and rw.function != DEFAULT_REWARD_FUNCTION:
        raise ConfigError(
            f"reward.function={echo(rw.function)} and reward.functions are both set; "
            "reward.functions replaces reward.function: list that function in "
            "reward.functions with its weight and leave reward.function unset"
        )
    for key, value, weight in rw.weighted_functions():
        _check_reward_path(key, value)
        weight_key = key.removesuffix(".function") + ".weight"
        _between(weight_key, weight, -MAX_ABS_REWARD, MAX_ABS_REWARD)
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
    if not 1.0 <= a.behaviour_imp_cap < math.inf:
        raise ConfigError(
            f"algorithm.behaviour_imp_cap={a.behaviour_imp_cap!r} must be a finite number >= 1 "
            "(the largest importance weight a token of an off-policy rollout gets)"
        )
    _at_least("algorithm.collapse_tau", a.collapse_tau, 0.0)
    _choice("algorithm.abs_minibatch_order", a.abs_minibatch_order, ABS_MINIBATCH_ORDERS)

    _choice("learner.backend", le.backend, ("fsdp2", "deepspeed"))
    _at_least("learner.num_ranks", le.num_ranks, 1)
    _at_least("learner.threads_per_rank", le.threads_per_rank, 1)
    _at_least("learner.num_gpus_per_rank", le.num_gpus_per_rank, 0.0)
    _choice("learner.zero_stage", str(le.zero_stage), ("0", "1", "2", "3"))
    _choice("learner.dtype", le.dtype, DTYPE_CHOICES)
    _between("learner.lr", le.lr, 0.0, 1.0, low_open=True)
    _at_least("learner.weight_decay", le.weight_decay, 0.0)
    _at_least("learner.grad_clip", le.grad_clip, 0.0)
    _at_least("learner.ppo_epochs", le.ppo_epochs, 1)
    _at_least("learner.global_batch_size", le.global_batch_size, 1)
    _at_least("learner.micro_batch_size", le.micro_batch_size, 1)
    _at_least("learner.micro_batch_tokens", le.micro_batch_tokens, 0)
    _resources("learner.ray_resources", le.ray_resources)
    if a.kl_coef > 0 and le.backend == "deepspeed" and le.zero_stage == 3:
        raise ConfigError(
            f"algorithm.kl_coef={a.kl_coef!r} with learner.backend=deepspeed needs "
            f"learner.zero_stage <= 2, got {le.zero_stage}: the reference model is kept whole "
            "on each rank, as ZeRO-2 keeps the policy; use learner.backend=fsdp2 to shard both"
        )
    _at_least("learner.lora_rank", le.lora_rank, 0)
    if le.lora_rank > 0:
        _between("learner.lora_alpha", le.lora_alpha, 0.0, math.inf, low_open=True)
        if not le.lora_target_modules or not all(
            isinstance(m, str) and m for m in le.lora_target_modules
        ):
            raise ConfigError(
                f"learner.lora_target_modules={echo(le.lora_target_modules)} must name at "
                "least one Linear layer, e.g. [q_proj, v_proj]"
            )
        if le.backend != "fsdp2":
            raise ConfigError(
                f"learner.lora_rank={le.lora_rank} needs learner.backend=fsdp2; LoRA is not "
                f"implemented for learner.backend={le.backend!r}"
            )
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
    _check_loggers(t.loggers)
    _choice("trainer.wandb_mode", t.wandb_mode, WANDB_MODES)
    _choice("trainer.mode", t.mode, TRAINER_MODES)
    if t.mode == "async" and b.max_staleness < 1:
        raise ConfigError(
            f"trainer.mode=async needs buffer.max_staleness >= 1 (got {b.max_staleness}): it is "
            "how many steps the rollout side may run ahead of the learner; with 0 nothing can "
            "overlap (use trainer.mode=sync), e.g. buffer.max_staleness=1"
        )
    if t.mode == "async" and b.keep_steps < b.max_staleness + 1:
        raise ConfigError(
            f"trainer.mode=async with buffer.max_staleness={b.max_staleness} holds up to "
            f"{b.max_staleness + 1} steps in the buffer at once, but buffer.keep_steps="
            f"{b.keep_steps} would evict the step the learner has yet to draw; set "
            f"buffer.keep_steps={b.max_staleness + 1} or more"
        )
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
