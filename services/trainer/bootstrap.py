"""What a run needs before its roles start: Ray (local or joined, token authentication),
the run's Redis (the configured one, or an embedded one), the dtypes the roles run in, and
the vocabulary size the buffer checks token ids against."""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import ray

from services.embedded_redis import PASSWORD_ENV, EmbeddedRedis, RedisTLS, probe, redact
from shuffle_r1.config import BufferConfig, Config, is_loopback
from shuffle_r1.precision import DtypeChoice, resolve_dtype

logger = logging.getLogger(__name__)


def init_ray(cfg: Config) -> None:
    """Join ``cluster.ray_address`` or start a local Ray, with ``RAY_AUTH_MODE`` set
    explicitly: ``$RAY_AUTH_MODE`` when the environment has it, else ``cluster.auth_mode``.

    A local Ray 2.60 listens on every interface whatever address it is given (its GCS,
    raylet and workers bind ``::``, measured; README "Security"), so token authentication is
    what keeps other hosts from running code on it. In token mode Ray reads its token from
    ``$RAY_AUTH_TOKEN`` / ``$RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, which is created
    (owner-only) when none of them exists.
    With ``auth_mode=disabled`` a local Ray logs a warning that anyone who reaches this
    machine can submit work to it. ``cluster.host`` is the node address a local Ray
    advertises (loopback by default: its processes talk over ``lo``).
    """
    if ray.is_initialized():
        return
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = cfg.cluster.auth_mode
        # Ray reads the mode into its config when it is imported: read it again, as Ray's
        # own token setup does (ray._private.authentication.authentication_token_setup)
        from ray._raylet import Config as RayConfig  # type: ignore[attr-defined]

        RayConfig.initialize("")
    mode = os.environ["RAY_AUTH_MODE"]
    repo = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": repo, "RAY_AUTH_MODE": mode}
    if cfg.cluster.ray_address == "local":
        if mode != "token":
            logger.warning(
                "Ray token authentication is off (RAY_AUTH_MODE=%s): the local Ray listens on "
                "every network interface, and anyone who reaches this machine can run code "
                "on it as this user. Use cluster.auth_mode=token (the default) unless the "
                "machine is isolated",
                mode,
            )
        else:
            _ensure_token_file()
        extra: dict[str, Any] = {}
        if cfg.cluster.metrics_export_port:
            extra["_metrics_export_port"] = cfg.cluster.metrics_export_port
        ray.init(
            address="local",  # a Ray of its own, even where `ray start` runs one beside it
            num_cpus=cfg.cluster.num_cpus or None,
            include_dashboard=False,
            namespace=cfg.cluster.namespace,
            runtime_env={"env_vars": env},
            logging_level=logging.WARNING,
            _node_ip_address=cfg.cluster.host,
            **extra,
        )
    else:
        ray.init(address=cfg.cluster.ray_address, namespace=cfg.cluster.namespace)


def _ensure_token_file() -> None:
    """Make sure a token-mode local Ray finds a token: unless ``$RAY_AUTH_TOKEN`` or
    ``$RAY_AUTH_TOKEN_PATH`` gives one, Ray reads ``~/.ray/auth_token`` (the file
    ``ray get-auth-token --generate`` writes; Ray 2.60 does not create it when
    ``RAY_AUTH_MODE=token`` is set explicitly, and its GCS aborts without one). Create it
    with 256 random bits, readable by its owner only, when it is missing; a ``shuffle-r1
    scale`` or ``ray`` command of the same user on this machine finds it there."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            logger.warning("%s is readable by other users: chmod 600 it", path)
        return
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    logger.info("Ray token authentication: created a token in %s", path)


def redis_for_run(b: BufferConfig, data_dir: Path) -> tuple[str, EmbeddedRedis | None]:
    """The Redis URL a run's buffer uses, and the private Redis started for it, if any.

    ``b.redis_url`` when a Redis answers there (with the configured password and TLS). For
    ``embedded``, or when nothing at all listens at a loopback URL (a machine without
    Redis), a private one is started with AOF persistence in ``data_dir``.

    Raises:
        RuntimeError: a Redis at the URL refuses it (a wrong password, a failed TLS
            handshake): the data the user pointed at would never be used, so no stand-in
            is started for it; or a remote Redis does not answer (a stand-in would keep the
            run's data on one node, unshared). The URL is redacted in the message.
    """
    url = b.redis_url
    if url != "embedded":
        why = probe(url, tls=RedisTLS(b.redis_tls_ca_cert, b.redis_tls_cert, b.redis_tls_key))
        if why is None:
            return url, None
        if why != "unreachable":
            raise RuntimeError(
                f"the Redis at {redact(url)} (buffer.redis_url) refuses this run: {why}; "
                f"check the password (in the URL or ${PASSWORD_ENV}) and the TLS settings"
            )
        if not is_loopback(urlsplit(url).hostname or ""):
            raise RuntimeError(
                f"no Redis answers at {redact(url)} (buffer.redis_url); check the host "
                "and port, or use 'embedded'"
            )
        logger.warning("no Redis answers at %s; starting an embedded one", redact(url))
    redis = EmbeddedRedis(appendonly=True, data_dir=data_dir).start()
    return redis.url, redis


def vocab_size(tokenizer: Any, model_path: str | Path) -> int:
    """Token ids a rollout may hold: the larger of the tokenizer's size and the model's
    output rows (Qwen2.5 pads 151,665 tokens to 151,936 rows, and an engine samples over
    all of them). The buffer refuses ids at or above it (``RunSpec.vocab_size``)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    rows = getattr(config.get_text_config(), "vocab_size", 0) or 0
    return max(len(tokenizer), int(rows))


def resolve_precision(cfg: Config) -> tuple[Config, dict[str, DtypeChoice]]:
    """``cfg`` with ``learner.dtype`` and ``rollout.dtype`` resolved (``auto`` →
    ``bfloat16`` or ``float32``, :mod:`shuffle_r1.precision`) for the devices the roles are
    given (GPUs per rank / per worker, else this machine's CPU), and each choice with why."""
    le, ro = cfg.learner, cfg.rollout
    choices = {
        "learner": resolve_dtype(le.dtype, cuda=le.num_gpus_per_rank > 0),
        "rollout": resolve_dtype(ro.dtype, cuda=ro.num_gpus_per_worker > 0),
    }
    resolved = dataclasses.replace(
        cfg,
        learner=dataclasses.replace(le, dtype=choices["learner"].dtype),
        rollout=dataclasses.replace(ro, dtype=choices["rollout"].dtype),
    )
    return resolved, choices
