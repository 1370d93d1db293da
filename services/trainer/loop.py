"""The trainer: one controller that drives every role through a training step (docs/DESIGN.md).

One step:

1. the data sampler draws ``trainer.rollout_batch_size`` prompts;
2. the rollout pool generates ``rollout.n`` rollouts per prompt, first syncing every worker
   to the newest weight version;
3. the reward pool scores them (docs/ALGORITHM.md §6);
4. the groups go to the replay buffer service over gRPC, which computes GRPO advantages
   and runs PTS (§1, §2); the trainer then samples the step's ABS batch (§3);
5. the learner group recomputes old-policy log-probs on that batch and updates the policy
   (§3.4, §4), then publishes the new weights once into the object store. When the update
   is a single optimizer step (one mini-batch, one PPO epoch) the old log-probs come from
   the update's own forward pass instead: the same weights, one forward pass fewer.

Metrics go to ``<output_dir>/metrics.jsonl`` (and Prometheus when ``trainer.metrics_port``
is set); a checkpoint every ``trainer.save_every`` steps lets ``--resume`` continue with the
same data order; evaluation on the held-out split every ``trainer.eval_every`` steps.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import ray
import torch
from tqdm import tqdm

from actors.learner import LearnerFailedError, LearnerGroup
from actors.reward import RewardPool, ScoreRequest
from actors.rollout import GenerationRequest, RolloutPool, SamplingSpec
from actors.serving import ensure_serve
from protos import replay_buffer_pb2 as pb
from services.embedded_redis import PASSWORD_ENV, EmbeddedRedis, RedisTLS, probe, redact
from services.replay_buffer.actor import start_replay_buffer_actor
from services.replay_buffer.client import ReplayBufferClient
from services.trainer.metrics import (
    MetricsWriter,
    TrainerExporter,
    plot_metrics,
    read_metrics,
    wilson_interval,
)
from services.trainer.runlock import RunLock
from services.trainer.state import (
    TrainerState,
    checkpoint_dir,
    files_under,
    latest_checkpoint,
    prune_checkpoints,
    read_manifest,
    read_state,
    run_key,
    saving_checkpoint,
    write_state,
)
from shuffle_r1.algos import advantage_collapse_share, grpo_advantages
from shuffle_r1.config import BufferConfig, Config, DataConfig, is_loopback, save_config
from shuffle_r1.data import (
    Example,
    ImageSpec,
    PromptSampler,
    load_examples,
    render_prompt,
)
from shuffle_r1.data.images import expand_image_tokens
from shuffle_r1.models import is_vision_language, resolve_model_path
from shuffle_r1.precision import DtypeChoice, cpu_description, resolve_dtype
from shuffle_r1.training import TrainBatch, abs_minibatch_rows, minibatch_pair_stats

logger = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2


@dataclass(frozen=True)
class Prompt:
    """A dataset example with its rendered, tokenised prompt and its prepared images
    (``shuffle_r1.data.images``: PNG bytes, their tokens expanded in ``token_ids``)."""

    example: Example
    token_ids: list[int]
    images: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class RunSummary:
    """What a run wrote and how it went. ``held_out`` is :func:`held_out_summary` of its
    ``metrics.jsonl`` (``None`` without evaluations); ``path`` the JSON copy of it all."""

    steps: int
    output_dir: Path
    metrics_path: Path
    plot_path: Path | None
    checkpoint: Path | None
    wall_s: float  # from the start of the Trainer's setup (Ray, engines, learner) to the end
    train_s: float  # the step loop and its evaluations
    last_metrics: dict[str, Any]
    held_out: dict[str, Any] | None
    path: Path


def tokenize_prompts(
    tokenizer: Any, examples: list[Example], max_len: int, policy: str, processor: Any = None
) -> tuple[list[Prompt], int]:
    """Render and tokenise every example; returns the prompts and how many were over
    ``max_len`` tokens. ``policy``: ``skip`` drops those, ``truncate`` keeps their last
    ``max_len`` tokens (the end of the problem and the generation prompt), ``error`` raises
    ``ValueError`` naming the first one.

    ``processor`` (a vision-language model's, ``shuffle_r1.processor``) renders the chat
    template, and each image placeholder is expanded to its image's tokens
    (``shuffle_r1.data.images.expand_image_tokens``; the example's images are prepared bytes,
    not resized again). A prompt with images is truncated only when every image token
    survives the cut; otherwise it is skipped. Raises ``ValueError`` for an example with
    images but no processor, or whose placeholders and images differ in number.
    """
    prompts, overlong = [], 0
    for ex in examples:
        text = render_prompt(processor or tokenizer, ex)
        image_token = -1
        images = tuple(image for image in ex.images if isinstance(image, bytes))
        if ex.images:
            if processor is None:
                raise ValueError(f"prompt {ex.uid!r} has images but the model has no processor")
            if len(images) != len(ex.images):
                raise ValueError(
                    f"prompt {ex.uid!r} has an image given as a path; load the data with an "
                    "image_spec so that every image is prepared bytes"
                )
            image_token = processor.image_token_id
            try:
                text = expand_image_tokens(
                    text, images, processor.image_processor, processor.image_token
                )
            except ValueError as exc:
                raise ValueError(f"prompt {ex.uid!r}: {exc}") from exc
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_len:
            overlong += 1
            if policy == "error":
                raise ValueError(
                    f"prompt {ex.uid!r} has {len(ids)} tokens, over data.max_prompt_length="
                    f"{max_len}; set data.overlong_prompt=skip or truncate"
                )
            if policy == "skip" or ids[-max_len:].count(image_token) != ids.count(image_token):
                continue
            ids = ids[-max_len:]
        prompts.append(Prompt(ex, list(ids), images))
    return prompts, overlong


def load_prompt_splits(
    d: DataConfig, tokenizer: Any, processor: Any = None, model: str | Path = "the model"
) -> tuple[list[Prompt], list[Prompt], int, int]:
    """The train and validation prompts of ``d`` (the first ``d.train_size`` / ``d.val_size``
    examples of each file, 0 = all; read, rendered, tokenised), with the rows skipped and the
    prompts over ``d.max_prompt_length``, over both files. The trainer's sampler indexes the
    train list.

    With a vision-language ``processor``, every image is decoded, resized
    (``d.min_pixels``..``d.max_pixels``) and encoded here; a row whose image cannot be used is
    skipped and counted (the first five are logged with file, row and why).

    Raises:
        ValueError: a file yields no usable prompt, or it has images and ``processor`` is None
            (``model`` is text-only).
    """
    spec = None
    if processor is not None:
        ip = processor.image_processor
        spec = ImageSpec(d.min_pixels, d.max_pixels, ip.patch_size * ip.merge_size)
    out, skipped, overlong = [], 0, 0
    for path, size in ((d.train_path, d.train_size), (d.val_path, d.val_size)):
        result = load_examples(
            path,
            problem_key=d.problem_key,
            answer_key=d.answer_key,
            image_key=d.image_key,
            id_key=d.id_key or None,
            answer_format=d.answer_format,
            image_root=d.image_root or None,
            image_spec=spec,
            limit=size or None,
        )
        for row in result.skipped[:5]:
            logger.warning("skipped %s", row)
        with_images = sum(bool(ex.images) for ex in result.examples)
        if with_images and processor is None:
            raise ValueError(
                f"{path}: {with_images} rows have images (data.image_key={d.image_key!r}) but "
                f"{model} is a text-only model; use a vision-language model, or set "
                "data.image_key='' to train on the text alone"
            )
        prompts, over = tokenize_prompts(
            tokenizer, list(result.examples), d.max_prompt_length, d.overlong_prompt, processor
        )
        skipped += len(result.skipped)
        overlong += over
        if not prompts:
            raise ValueError(f"{path}: no usable prompt (all rows skipped or overlong)")
        out.append(prompts)
    train, val = out
    logger.info("data: %d train prompts, %d validation prompts", len(train), len(val))
    return train, val, skipped, overlong


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


def held_out_summary(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Held-out accuracy before training (the ``step`` -1 row) and at the last evaluation,
    each with its 95% Wilson interval, from ``metrics.jsonl``'s rows; ``None`` when the run
    has no evaluation. Keys: ``n_eval`` (samples per evaluation), ``acc_before``,
    ``acc_before_ci``, ``acc_after``, ``acc_after_ci``, ``after_step`` (training steps done at
    the last evaluation), ``gain``. The interval treats the samples as independent trials,
    exact for one sample per problem (``rollout.val_n=1``), too narrow for more."""
    evals = [r for r in rows if r.get("val/accuracy") is not None]
    if not evals:
        return None
    first, last = evals[0], evals[-1]
    n = int(last.get("val/samples") or 0)
    out: dict[str, Any] = {"n_eval": n}
    if first["step"] == -1:
        out["acc_before"] = first["val/accuracy"]
        out["acc_before_ci"] = wilson_interval(first["val/accuracy"], n)
    out["acc_after"] = last["val/accuracy"]
    out["acc_after_ci"] = wilson_interval(last["val/accuracy"], n)
    out["after_step"] = int(last["step"]) + 1
    if "acc_before" in out and last is not first:
        out["gain"] = out["acc_after"] - out["acc_before"]
    return out


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


def _image_bytes(prompt_id: str, images: Any) -> tuple[bytes, ...]:
    """The encoded images of a sampled group (``SampleResponse.images[prompt_id]``). Raises
    ``ValueError`` for an image given by URI: the trainer puts bytes, and a URI would be
    readable only where its storage is."""
    if any(image.WhichOneof("source") != "data" for image in images):
        raise ValueError(
            f"group {prompt_id!r}: the replay buffer returned an image by URI; the learner "
            "needs the encoded bytes (put images as Image.data)"
        )
    return tuple(image.data for image in images)


class Trainer:
    """Builds every role for ``cfg`` and runs the step loop; see the module doc.

    ``resume=True`` continues from the newest complete checkpoint in
    ``trainer.output_dir`` (model, optimizer, sampler position, RNG, weight version).
    Call :meth:`close` (or use as a context manager) to stop the roles.
    """

    def __init__(self, cfg: Config, resume: bool = False) -> None:
        self.created = time.perf_counter()  # setup counts in the run's wall time
        cfg, self.precision = resolve_precision(cfg)
        self.cfg = cfg
        self.out = Path(cfg.trainer.output_dir)
        # one run per folder, before anything in it is touched (RunLockedError otherwise)
        self.lock = RunLock(self.out).acquire()
        self.cpu = cpu_description()
        said = ", ".join(f"{role} {c.dtype} ({c.reason})" for role, c in self.precision.items())
        self.precision_text = ", ".join(f"{r} {c.dtype}" for r, c in self.precision.items())
        logger.info("precision: %s; processor: %s", said, self.cpu)
        save_config(cfg, self.out / "config.yaml", f"precision: {said}\nprocessor: {self.cpu}")
        self.run_id = cfg.trainer.run_name
        self.state = TrainerState()
        self.counters: dict[str, float] = {}
        self.last_prompt_ids: list[str] = []
        torch.manual_seed(cfg.trainer.seed)

        init_ray(cfg)
        redis_url, self._redis = redis_for_run(cfg.buffer, self.out / "redis")
        self.model_path = resolve_model_path(cfg.learner.model_path)
        self.processor: Any = None  # a vision-language model's (shuffle_r1.processor)
        if is_vision_language(self.model_path):
            from shuffle_r1.processor import load_processor

            self.processor = load_processor(self.model_path)
            self.tokenizer = self.processor.tokenizer
        else:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.train_prompts, self.val_prompts = self._load_data()
        self.sampler = PromptSampler(
            len(self.train_prompts),
            cfg.trainer.rollout_batch_size,
            seed=cfg.data.seed,
            shuffle=cfg.data.shuffle,
        )
        self.buffer_actor = start_replay_buffer_actor(
            dataclasses.replace(cfg.buffer, redis_url=redis_url), cfg.algorithm
        )
        self.buffer = self._connect_buffer()
        self.spec = pb.RunSpec(
            algorithm=cfg.algorithm.name,
            keep_ratio=cfg.algorithm.keep_ratio,
            shuffle_times=cfg.algorithm.shuffle_times,
            seed=cfg.trainer.seed,
            vocab_size=vocab_size(self.tokenizer, self.model_path),  # refuses ids outside
        )
        ensure_serve(cfg.reward.http_host, cfg.reward.http_port)
        self.rollout = RolloutPool(
            cfg.rollout,
            self.model_path,
            self.run_id,
            cfg.cluster.namespace,
            seed=cfg.trainer.seed,
        )
        self.reward = RewardPool(cfg.reward, self.run_id)
        self.learner = LearnerGroup(cfg, self.model_path)
        self.metrics_path = self.out / "metrics.jsonl"
        self.prompts_path = self.out / "prompts.jsonl"  # the prompt ids each step drew
        if resume:
            self._resume()
        else:
            self.buffer.drop_run(self.run_id)
            self.metrics_path.unlink(missing_ok=True)
            self.prompts_path.unlink(missing_ok=True)
        self.metrics = MetricsWriter(self.metrics_path)
        self.exporter = TrainerExporter(cfg.trainer.metrics_port, cfg.trainer.metrics_host)
        self.exporter.set_live_workers("rollout", lambda: self.rollout.num_workers)
        self.exporter.set_live_workers("reward", lambda: self.reward.num_workers)
        self.exporter.set_live_workers("learner", lambda: len(self.learner.workers))
        self.exporter.track_queue_depth(lambda: self.rollout.pending)
        for kind in ("skipped_rows", "overlong_prompts"):
            self.exporter.count_error("data", kind, self.counters.get(f"data/{kind}", 0))

    # ---- setup -------------------------------------------------------------------------

    def _connect_buffer(self) -> ReplayBufferClient:
        """A client for the buffer actor's current address (it changes when Ray restarts
        the actor: the server binds a new free port). With ``buffer.tls_cert`` it connects
        over TLS, trusting ``buffer.tls_ca_cert`` (or the certificate itself when that is
        empty), and presents ``buffer.tls_client_cert``/``tls_client_key`` if set."""
        b = self.cfg.buffer
        return ReplayBufferClient(
            ray.get(self.buffer_actor.address.remote()),
            token=b.auth_token or None,
            root_cert=(b.tls_ca_cert or b.tls_cert) if b.tls_cert else None,
            max_message_mb=b.max_message_mb,
            client_cert=b.tls_client_cert or None,
            client_key=b.tls_client_key or None,
        )

    def _put_and_sample(self, groups: list[pb.Group], step: int) -> tuple[Any, Any]:
        """Put the step's groups and draw its batch; survive the buffer's two failures:

        - the buffer is unreachable (its actor died and Ray restarted it, on a new port):
          reconnect and redo both — a put is idempotent and the draw is deterministic per
          step, so nothing is lost or doubled;
        - the buffer lost groups it had acknowledged (Redis restarted without persistence):
          Sample refuses the short step (``expected_groups``), the buffer's stats confirm
          fewer groups than were put, and the trainer puts the step's groups again from its
          memory, never training on a partial batch.

        Each recovery is tried once per call, then the error propagates.
        """
        recovered: set[str] = set()
        put = None  # the first acknowledged put: a retry finds the groups there (duplicates)
        while True:
            try:
                put = put or self.buffer.put_groups(groups, spec=self.spec)
                sample = self.buffer.sample(
                    self.run_id,
                    step,
                    policy_version=self.learner.version,
                    expected_groups=len(groups),
                    spec=self.spec,
                )
                return put, sample
            except grpc.RpcError as exc:
                kind = self._buffer_failure(exc, step, len(groups))
                if kind is None or kind in recovered:
                    raise
                recovered.add(kind)
                if kind == "regenerated_step":
                    put = None  # the buffer lost it: put again
                self.counters[f"buffer/{kind}s"] = self.counters.get(f"buffer/{kind}s", 0) + 1
                self.exporter.count_error("buffer", kind)

    def _buffer_failure(self, exc: grpc.RpcError, step: int, expected: int) -> str | None:
        """``"reconnect"`` (after reconnecting) or ``"regenerated_step"`` when ``exc`` is a
        failure :meth:`_put_and_sample` recovers from, else None."""
        code = exc.code()  # type: ignore[attr-defined]
        if code == grpc.StatusCode.UNAVAILABLE:
            logger.warning(
                "replay buffer at %s unreachable (%s); reconnecting",
                self.buffer.address,
                exc.details(),  # type: ignore[attr-defined]
            )
            self.buffer.close()
            self.buffer = self._connect_buffer()
            return "reconnect"
        if code not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
            return None
        try:
            stats = self.buffer.stats(self.run_id)
            held = next((s.groups_accepted for s in stats.steps if s.step == step), 0)
        except grpc.RpcError as stats_exc:
            if stats_exc.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                raise
            held = 0  # the buffer does not know the run any more
        if held >= expected:
            return None  # not a loss: a real precondition failure (another spec, ...)
        logger.warning(
            "replay buffer holds %d of step %d's %d groups (%s); putting them again",
            held,
            step,
            expected,
            exc.details(),  # type: ignore[attr-defined]
        )
        return "regenerated_step"

    def _load_data(self) -> tuple[list[Prompt], list[Prompt]]:
        """Both splits, tokenised (:func:`load_prompt_splits`); their skipped rows and
        overlong prompts are counted in ``data/skipped_rows`` / ``data/overlong_prompts``."""
        train, val, skipped, overlong = load_prompt_splits(
            self.cfg.data, self.tokenizer, self.processor, self.model_path
        )
        self.counters["data/skipped_rows"] = self.counters.get("data/skipped_rows", 0) + skipped
        self.counters["data/overlong_prompts"] = (
            self.counters.get("data/overlong_prompts", 0) + overlong
        )
        return train, val

    def _resume(self) -> None:
        """Restore everything from the newest checkpoint whose files match its manifest
        (``services.trainer.state``: a damaged or altered one is logged and skipped)."""
        key = run_key(self.cfg.buffer.auth_token)
        ckpt = latest_checkpoint(self.out, key)
        if ckpt is None:
            raise FileNotFoundError(
                f"--resume: no complete checkpoint that matches its manifest under "
                f"{self.out / 'checkpoints'} (the log names any that were rejected)"
            )
        files = files_under(read_manifest(ckpt, key), "learner")
        self.learner.load_checkpoint(ckpt / "learner", files)
        self.state = read_state(ckpt, key)
        self.sampler.load_state_dict(self.state.sampler)
        self.counters.update(self.state.counters)
        # Steps after the checkpoint are regenerated; their stored groups would clash.
        self.buffer.drop_run(self.run_id)
        logger.info(
            "resumed from %s at step %d, weight version %d",
            ckpt,
            self.state.step,
            self.learner.version,
        )

    # ---- the step ----------------------------------------------------------------------

    def _weights(self) -> tuple[int, ray.ObjectRef] | None:
        return self.learner.publish_weights() if self.learner.version > 0 else None

    def _generate(self, prompts: list[Prompt], sampling: SamplingSpec, tag: str) -> Any:
        requests = [
            GenerationRequest(f"{tag}/{p.example.uid}", p.token_ids, p.images) for p in prompts
        ]
        return self.rollout.generate(requests, sampling, self._weights())

    def _score(self, prompts: list[Prompt], completions: list[Any], n: int) -> list[Any]:
        texts = self.tokenizer.batch_decode(
            [c.token_ids for c in completions], skip_special_tokens=True
        )
        answers = [p.example.answer for p in prompts for _ in range(n)]
        scores = self.reward.score(
            [ScoreRequest(t, a) for t, a in zip(texts, answers, strict=True)]
        )
        for error in (s.error for s in scores if s.error is not None):
            self.exporter.count_error("reward", error.split(":", 1)[0])
        return scores

    def _count(self, key: str, amount: float) -> None:
        """Add to a cumulative counter (reported with every step's metrics)."""
        self.counters[key] = self.counters.get(key, 0) + amount

    def step(self, step: int) -> dict[str, float]:
        """Run training step ``step`` (0-based) and return its metrics."""
        cfg, n = self.cfg, self.cfg.rollout.n
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        prompts = [self.train_prompts[i] for i in self.sampler.next_batch()]
        self.last_prompt_ids = [p.example.uid for p in prompts]
        with self.prompts_path.open("a") as f:
            f.write(json.dumps({"step": step, "prompt_ids": self.last_prompt_ids}) + "\n")
        sampling = SamplingSpec(
            n=n,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            max_tokens=cfg.rollout.max_response_length,
            seed=cfg.trainer.seed * 1_000_003 + step,
        )
        gen = self._generate(prompts, sampling, f"s{step}")
        times["generate"], times["rollout_sync"] = gen.generate_s, gen.sync_s
        times["generate_engine"] = gen.engine_s  # inside the engines, without serving

        t = time.perf_counter()
        scores = self._score(prompts, gen.completions, n)
        times["reward"] = time.perf_counter() - t

        t = time.perf_counter()
        groups = []
        for g, p in enumerate(prompts):
            rollouts = [
                pb.Rollout(
                    token_ids=c.token_ids,
                    logprobs=c.logprobs,
                    reward=s.reward,
                    weight_version=c.weight_version,
                    truncated=c.finish_reason == "length",
                )
                for c, s in zip(
                    gen.completions[g * n : (g + 1) * n], scores[g * n : (g + 1) * n], strict=True
                )
            ]
            groups.append(
                pb.Group(
                    run_id=self.run_id,
                    step=step,
                    prompt_id=p.example.uid,
                    prompt_token_ids=p.token_ids,
                    answer=p.example.answer,
                    rollouts=rollouts,
                    images=[pb.Image(data=image) for image in p.images],
                )
            )
        self._count("rollout/images", sum(c.images for c in gen.completions if c.index == 0))
        put, sample = self._put_and_sample(groups, step)
        times["buffer"] = time.perf_counter() - t

        rewards = torch.tensor([s.reward for s in scores], dtype=torch.float64).view(-1, n)
        advantages = grpo_advantages(rewards).flatten()
        pair_draws = [0] * sample.pairs_total  # how often ABS drew each kept pair (§3)
        for item in sample.items[::2] if sample.pairs_total else ():
            pair_draws[item.pair_index] += 1
        m: dict[str, float] = {
            "reward/mean": rewards.mean().item(),
            "reward/accuracy": sum(s.accuracy for s in scores) / len(scores),
            "reward/format": sum(s.format for s in scores) / len(scores),
            "reward/errors": float(sum(s.error is not None for s in scores)),
            "rollout/tokens": float(gen.tokens),
            "rollout/tokens_per_s": gen.tokens / max(gen.generate_s, 1e-9),
            "rollout/response_len_mean": gen.tokens / len(gen.completions),
            "rollout/truncated_share": sum(c.finish_reason == "length" for c in gen.completions)
            / len(gen.completions),
            "rollout/weight_version": float(min(c.weight_version for c in gen.completions)),
            "rollout/resent": float(gen.resent),
            "rollout/workers": float(len(gen.served)),
            "buffer/pairs_kept": float(put.pairs_kept),
            "buffer/pairs_dropped": float(put.pairs_dropped),
            "buffer/batch_rollouts": float(len(sample.items)),
            "buffer/pairs_drawn": float(len(sample.items) // 2 if sample.pairs_total else 0),
            "buffer/shortfall": float(sample.shortfall),
            "buffer/stale_dropped": float(put.stale + sample.stale_dropped),
            "diag/collapse_share_before_pts": advantage_collapse_share(
                advantages, cfg.algorithm.collapse_tau
            ),
            "diag/collapse_share_after_abs": sample.advantage_collapse_share,
            "diag/silence_ratio": sample.rollout_silence_ratio,
        }

        m["learner/skipped_update"] = float(sample.skipped or not sample.items)
        if sample.skipped or not sample.items:
            self.counters["learner/skipped_updates"] = (
                self.counters.get("learner/skipped_updates", 0) + 1
            )
            logger.warning("step %d: every kept pair has weight 0; update skipped", step)
        else:
            images = {pid: _image_bytes(pid, found.images) for pid, found in sample.images.items()}
            self._count("buffer/images", sum(len(v) for v in images.values()))
            batch = TrainBatch(
                prompt_token_ids=[list(it.prompt_token_ids) for it in sample.items],
                response_token_ids=[list(it.rollout.token_ids) for it in sample.items],
                advantages=torch.tensor([it.advantage for it in sample.items]),
                images=[images.get(it.prompt_id, ()) for it in sample.items] if images else [],
            )
            t = time.perf_counter()
            # One optimizer step on these weights: the update's forward pass gives the old
            # log-probs (LearnerGroup.single_step), a separate pass would repeat it.
            reuse = self.learner.single_step(len(batch))
            old = None if reuse else self.learner.compute_logprobs(batch)
            times["old_logprobs"] = time.perf_counter() - t
            m["learner/old_logprobs_reused"] = float(reuse)
            t = time.perf_counter()
            minibatches = self._minibatches(sample)
            if minibatches is not None:
                pairs = [it.pair_index for it in sample.items]
                m.update(
                    {f"abs/{k}": v for k, v in minibatch_pair_stats(pairs, minibatches).items()}
                )
            m.update(
                {f"learner/{k}": v for k, v in self.learner.update(batch, old, minibatches).items()}
            )
            times["update"] = time.perf_counter() - t
            t = time.perf_counter()
            self.learner.publish_weights()
            times["publish"] = time.perf_counter() - t
        m["weight_version"] = float(self.learner.version)
        m["time/weight_sync_s"] = times.get("publish", 0.0) + times["rollout_sync"]
        for k, v in times.items():
            m[f"time/{k}_s"] = v
        m["time/step_s"] = time.perf_counter() - t0
        m.update(self.counters)
        self.exporter.observe_step(step + 1, m, advantages.tolist(), pair_draws)
        self.exporter.count_error("rollout", "resent", gen.resent)
        return m

    def _minibatches(self, sample: Any) -> list[list[int]] | None:
        """The rows of each optimizer mini-batch of a sampled PTS batch: by
        ``algorithm.abs_minibatch_order`` over the rounds the buffer drew (one round under
        ``grpo+pts``, where both orders agree). None under ``grpo``: consecutive runs."""
        if not sample.round_sizes:
            return None
        return abs_minibatch_rows(
            list(sample.round_sizes),
            self.learner.rollouts_per_minibatch,
            self.cfg.algorithm.abs_minibatch_order,
        )

    def evaluate(self) -> dict[str, float]:
        """Mean pass@1 on the validation prompts at ``rollout.val_temperature`` (0: greedy)
        with ``rollout.val_n`` samples each (docs/ALGORITHM.md §7)."""
        cfg = self.cfg.rollout
        sampling = SamplingSpec(
            n=cfg.val_n,
            temperature=cfg.val_temperature,  # 0: greedy
            top_p=cfg.top_p,
            max_tokens=cfg.max_response_length,
            seed=self.cfg.trainer.seed,
        )
        t = time.perf_counter()
        gen = self._generate(self.val_prompts, sampling, "val")
        scores = self._score(self.val_prompts, gen.completions, cfg.val_n)
        result = {
            "val/accuracy": sum(s.accuracy for s in scores) / len(scores),
            "val/reward": sum(s.reward for s in scores) / len(scores),
            "val/format": sum(s.format for s in scores) / len(scores),
            "val/samples": float(len(scores)),
            "time/eval_s": time.perf_counter() - t,
        }
        self.exporter.observe_step(self.state.step, result)
        return result

    def save(self) -> Path:
        """Checkpoint the steps done (``services.trainer.state.saving_checkpoint``: written
        under a temporary name with a manifest, then renamed), keep the newest
        ``KEEP_CHECKPOINTS``; returns the folder.

        Raises:
            CheckpointWriteError: no space, quota or permission to write it: an operator
                error, which stops the run (not a learner failure; nothing is restarted).
        """
        self.state.weight_version = self.learner.version
        self.state.sampler = self.sampler.state_dict()
        self.state.counters = dict(self.counters)
        key = run_key(self.cfg.buffer.auth_token)
        with saving_checkpoint(self.out, self.state.step, key) as folder:
            self.learner.save_checkpoint(folder / "learner")
            write_state(folder, self.state)
        saved = checkpoint_dir(self.out, self.state.step)
        prune_checkpoints(self.out, KEEP_CHECKPOINTS, saved)
        return saved

    def run(self) -> RunSummary:
        """Train until ``trainer.total_steps``; returns where everything was written."""
        cfg = self.cfg.trainer
        started = time.perf_counter()
        last: dict[str, Any] = {}
        ckpt = latest_checkpoint(self.out, verify=False)  # for the summary; loaded: verified
        if cfg.eval_every and cfg.val_before_train and self.state.step == 0:
            logger.info("evaluating on %d held-out prompts before training", len(self.val_prompts))
            before = self.evaluate()
            logger.info("held-out accuracy before training: %.3f", before["val/accuracy"])
            self.metrics.write(-1, before)  # step -1: before step 0's update
        dtypes = {c.dtype for c in self.precision.values()}
        bar = tqdm(
            initial=self.state.step,
            total=cfg.total_steps,
            desc=f"train [{'/'.join(sorted(dtypes))}]",
            unit="step",
            dynamic_ncols=True,
        )
        while self.state.step < cfg.total_steps:
            step = self.state.step
            try:
                metrics = self.step(step)
                self.state.step = step + 1
                self.state.buffer_cursor = step
                if cfg.eval_every and (
                    self.state.step % cfg.eval_every == 0 or self.state.step == cfg.total_steps
                ):
                    metrics.update(self.evaluate())
                self.metrics.write(step, metrics)
                if cfg.save_every and (
                    self.state.step % cfg.save_every == 0 or self.state.step == cfg.total_steps
                ):
                    ckpt = self.save()
            except LearnerFailedError as exc:
                self._rebuild_learner(exc)
                bar.n = self.state.step
                continue
            last = metrics
            bar.update(1)
            bar.set_postfix(
                reward=f"{metrics['reward/mean']:.3f}",
                acc=f"{metrics['reward/accuracy']:.3f}",
                loss=f"{metrics.get('learner/policy_loss', math.nan):.4f}",
                step_s=f"{metrics['time/step_s']:.1f}",
            )
        bar.close()
        if self.learner.version > 0:  # every rollout worker ends on the newest weights
            self.rollout.sync(self.learner.publish_weights())
        plot = plot_metrics(self.metrics_path, self.out / "metrics.png") if last else None
        summary = RunSummary(
            steps=self.state.step,
            output_dir=self.out,
            metrics_path=self.metrics_path,
            plot_path=plot,
            checkpoint=ckpt,
            wall_s=time.perf_counter() - self.created,
            train_s=time.perf_counter() - started,
            last_metrics=last,
            held_out=held_out_summary(read_metrics(self.metrics_path)),
            path=self.out / "summary.json",
        )
        record = {
            "run": self.run_id,
            "cpu": self.cpu,
            "dtype": {role: c.dtype for role, c in self.precision.items()},
            "steps": summary.steps,
            "wall_s": summary.wall_s,
            "train_s": summary.train_s,
            **(summary.held_out or {}),
        }
        summary.path.write_text(json.dumps(record, indent=1) + "\n")
        return summary

    def _rebuild_learner(self, failure: LearnerFailedError) -> None:
        """A learner rank died: start a new learner group, restore it and the driver's state
        (data sampler, RNG, counters) from the newest checkpoint (or from the start without
        one), and let :meth:`run` continue from there — the steps after the checkpoint are
        trained again on the same prompts. At most ``trainer.max_learner_restarts`` times,
        then ``failure`` propagates.

        The restored weights get a new, higher weight version than any published before, so
        every rollout worker reloads them (a worker never keeps weights the learner lost).
        """
        rebuilt = int(self.counters.get("learner/rebuilt", 0)) + 1
        if rebuilt > self.cfg.trainer.max_learner_restarts:
            raise failure
        logger.error(
            "learner failed at step %d (%s); rebuilding it (%d of at most %d)",
            self.state.step,
            failure,
            rebuilt,
            self.cfg.trainer.max_learner_restarts,
        )
        newest = self.learner.version
        self.learner.shutdown(graceful=False)
        self.learner = LearnerGroup(self.cfg, self.model_path)
        key = run_key(self.cfg.buffer.auth_token)
        ckpt = latest_checkpoint(self.out, key)
        if ckpt is None:
            logger.error("no verified checkpoint in %s: training restarts from step 0", self.out)
            self.state = TrainerState()
            self.sampler.load_state_dict({**self.sampler.state_dict(), "epoch": 0, "position": 0})
            torch.manual_seed(self.cfg.trainer.seed)
        else:
            files = files_under(read_manifest(ckpt, key), "learner")
            self.learner.load_checkpoint(ckpt / "learner", files)
            self.state = read_state(ckpt, key)
            self.sampler.load_state_dict(self.state.sampler)
            self.counters.update(self.state.counters)
        self.counters["learner/rebuilt"] = rebuilt
        self.exporter.count_error("learner", "rebuilt")
        self.learner.version = max(newest, self.learner.version) + 1
        self.buffer.drop_run(self.run_id)  # the steps after the checkpoint are put again
        logger.info(
            "learner rebuilt from %s; continuing at step %d with weight version %d",
            ckpt or "the initial model",
            self.state.step,
            self.learner.version,
        )

    def close(self, abandon: bool = False) -> None:
        """Stop the roles: delete the Serve applications (a rollout replica first finishes its
        request, up to ``rollout.drain_timeout_s``), let the learner ranks leave their process
        group, stop the buffer and the embedded Redis.

        ``abandon=True`` (the run was interrupted) waits for none of that: the Serve
        applications are deleted without waiting for their drain and Ray is shut down — a
        local Ray that this process started stops with every worker and the engines inside
        them; on a cluster the run's other actors end with the driver's job.
        """
        if abandon:
            from ray import serve

            for app in (self.rollout.app, self.reward.app):
                try:
                    serve.delete(app, _blocking=False)
                except Exception as exc:  # abandoning: report and go on
                    logger.warning("deleting Serve application %s: %s", app, exc)
            ray.shutdown()
        else:
            for role in (self.rollout, self.reward, self.learner):
                try:
                    role.shutdown()
                except Exception as exc:  # shutting down: report and go on
                    logger.warning("shutdown of %s: %s", type(role).__name__, exc)
            ray.kill(self.buffer_actor, no_restart=True)
        self.exporter.close()
        self.buffer.close()
        if self._redis is not None:
            self._redis.close()
        self.lock.release()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        self.close(abandon=isinstance(exc, KeyboardInterrupt))  # Ctrl-C: stop, do not drain
