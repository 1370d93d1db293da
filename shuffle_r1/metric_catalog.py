"""Every Prometheus metric the system exports, by role: the one list that the exporters, the
metrics test and the Grafana dashboard (``deploy/grafana/shuffle-r1.json``) agree on.

Names are as a dashboard queries them: ``shuffle_r1_*``, counters ending in ``_total``,
histograms as their base name (scraped as ``_bucket``, ``_sum``, ``_count``). Two kinds of
exporter serve them:

- **prometheus-client** in the processes that are services of their own: the trainer
  (``trainer.metrics_port``) and the replay buffer (``buffer.metrics_port``, or
  ``shuffle-r1 buffer serve --metrics-port``);
- **Ray's metrics API** (``ray.util.metrics``) inside the Ray actors (rollout, reward and
  learner workers), scraped from each Ray node's metrics export port; each series carries
  the ``run`` (``trainer.run_name``) it belongs to. Ray prefixes custom
  metrics with ``ray_`` (``ray_shuffle_r1_rollout_worker_tokens_total``); the Prometheus
  scrape configs in ``deploy/`` strip that prefix (:data:`RAY_PREFIX_RELABEL`), so every
  dashboard query uses the names below.

Pure data: importing it needs neither Ray nor prometheus-client.
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("counter", "gauge", "histogram")
ROLES = ("trainer", "buffer", "rollout", "reward", "learner")
# Roles whose metrics go through Ray's metrics API (exported with the ``ray_`` prefix).
RAY_ROLES = ("rollout", "reward", "learner")
RAY_PREFIX = "ray_"
# Prometheus relabel rule that turns Ray's exported names back into the catalog's.
RAY_PREFIX_RELABEL = {"regex": "ray_(shuffle_r1_.*)", "replacement": "$1"}

# Bucket edges shared by exporters and dashboards.
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)
ADVANTAGE_BUCKETS = tuple(round(-3 + 0.25 * i, 2) for i in range(25))  # -3 .. 3
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 16)  # weight versions
# Histograms with negative bucket edges: exported without ``_sum`` (MetricSpec.series).
NEGATIVE_HISTOGRAMS = ("shuffle_r1_advantage",)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric.

    Attributes:
        name: the name a dashboard queries (module doc).
        kind: ``counter``, ``gauge`` or ``histogram``.
        role: the process that exports it (:data:`ROLES`).
        help: what it measures, with its unit.
        labels: label names beyond those the exporter adds itself.
    """

    name: str
    kind: str
    role: str
    help: str
    labels: tuple[str, ...] = ()

    @property
    def series(self) -> tuple[str, ...]:
        """The sample names a scrape shows for it: histograms have ``_bucket`` and ``_count``,
        and ``_sum`` unless a bucket edge is negative (OpenMetrics, which prometheus-client
        follows, omits the sum of a histogram that may observe negative values)."""
        if self.kind == "histogram":
            with_sum = self.name not in NEGATIVE_HISTOGRAMS
            return (f"{self.name}_bucket", *([f"{self.name}_sum"] * with_sum), f"{self.name}_count")
        return (self.name,)


def _m(name: str, kind: str, role: str, help: str, *labels: str) -> MetricSpec:
    return MetricSpec("shuffle_r1_" + name, kind, role, help, labels)


CATALOG: tuple[MetricSpec, ...] = (
    # --- trainer (the driver's step loop) -------------------------------------------------
    _m("trainer_step", "gauge", "trainer", "Training steps completed"),
    _m("weight_version", "gauge", "trainer", "Weight version of the learner's policy"),
    _m("step_seconds", "histogram", "trainer", "Wall time of one training step, seconds"),
    _m(
        "phase_seconds",
        "histogram",
        "trainer",
        "Wall time of one phase of a step, seconds (generate, rollout_sync, reward, buffer, "
        "old_logprobs, update, publish, eval)",
        "phase",
    ),
    _m("rollout_tokens_total", "counter", "trainer", "Response tokens generated"),
    _m("rollout_tokens_per_second", "gauge", "trainer", "Generation throughput of the last step"),
    _m(
        "rollout_queue_depth",
        "gauge",
        "trainer",
        "Rollout requests (prompts) sent and not yet answered",
    ),
    _m(
        "rollout_truncated_share",
        "gauge",
        "trainer",
        "Share of the last step's rollouts cut at the length limit",
    ),
    _m("reward_mean", "gauge", "trainer", "Mean reward of the last step's rollouts", "split"),
    _m("reward_accuracy", "gauge", "trainer", "Mean accuracy (0/1) of the last rollouts", "split"),
    _m("reward_format", "gauge", "trainer", "Mean format reward (0/1), last rollouts", "split"),
    _m(
        "advantage",
        "histogram",
        "trainer",
        "GRPO advantage of every rollout generated, before PTS (docs/algorithm.md §1, §5)",
    ),
    _m(
        "advantage_collapse_share",
        "gauge",
        "trainer",
        "Share of rollouts with |A| < tau, before PTS and after ABS (§5)",
        "stage",
    ),
    _m(
        "rollout_silence_ratio",
        "gauge",
        "trainer",
        "Share of the trained rollouts that carry no gradient (§5)",
    ),
    _m("pts_pairs_kept_total", "counter", "trainer", "Pairs kept by PTS (§2)"),
    _m("pts_pairs_dropped_total", "counter", "trainer", "Pairs dropped by PTS (§2)"),
    _m("abs_pairs_drawn_total", "counter", "trainer", "Pairs drawn by ABS into training batches"),
    _m(
        "abs_pair_draws",
        "histogram",
        "trainer",
        "Times each kept pair was drawn in its step's ABS batch (0..S, §3)",
    ),
    _m("abs_shortfall_total", "counter", "trainer", "Pairs ABS wanted but could not draw (§3)"),
    _m("skipped_updates_total", "counter", "trainer", "Steps whose update was skipped (no signal)"),
    _m(
        "weight_sync_seconds",
        "histogram",
        "trainer",
        "Publishing new weights and loading them on the rollout workers, seconds per step",
    ),
    _m(
        "rollout_staleness",
        "histogram",
        "trainer",
        "Weight versions each trained rollout lags the learner's policy (0 in sync mode; at "
        "most buffer.max_staleness in async mode)",
    ),
    _m(
        "idle_seconds_total",
        "counter",
        "trainer",
        "Seconds the rollout side (producer) or the learner (consumer) waited on the other",
        "side",
    ),
    _m("live_workers", "gauge", "trainer", "Live workers per role", "role"),
    _m(
        "errors_total",
        "counter",
        "trainer",
        "Failures handled without stopping the run, by role and kind",
        "role",
        "kind",
    ),
    _m("learner_policy_loss", "gauge", "trainer", "Mean policy loss of the last update"),
    _m("learner_grad_norm", "gauge", "trainer", "Mean gradient norm (before clipping)"),
    _m("learner_clip_fraction", "gauge", "trainer", "Share of tokens whose ratio was clipped"),
    _m("learner_kl", "gauge", "trainer", "Mean KL to the reference policy (0 when off)"),
    _m(
        "learner_behaviour_imp_weight",
        "gauge",
        "trainer",
        "Mean truncated importance weight min(pi_old / pi_behaviour, cap) of the tokens of the "
        "last update (1 for on-policy rollouts; §4 decoupled loss)",
    ),
    _m(
        "learner_behaviour_truncated_fraction",
        "gauge",
        "trainer",
        "Share of the last update's tokens whose importance weight was truncated to "
        "algorithm.behaviour_imp_cap (0 for on-policy rollouts)",
    ),
    _m(
        "learner_positions_per_token",
        "gauge",
        "trainer",
        "Token positions the last update ran per trained token (above 1: padding; below 1: "
        "prompts shared by their rollouts, run once)",
    ),
    _m(
        "learner_peak_memory_bytes",
        "gauge",
        "trainer",
        "Largest per-micro-batch memory peak of a learner rank in the last update (resident "
        "set on CPU, allocated memory on CUDA), bytes",
    ),
    # --- replay buffer service --------------------------------------------------------------
    _m("buffer_requests_total", "counter", "buffer", "RPCs answered", "method", "code"),
    _m("buffer_request_seconds", "histogram", "buffer", "RPC handling time, seconds", "method"),
    _m("buffer_groups_put_total", "counter", "buffer", "Groups received, by outcome", "outcome"),
    _m("buffer_pairs_kept_total", "counter", "buffer", "Pairs kept by PTS (stored groups)"),
    _m("buffer_pairs_dropped_total", "counter", "buffer", "Pairs dropped by PTS"),
    _m("buffer_stale_dropped_total", "counter", "buffer", "Stale groups dropped", "where"),
    _m("buffer_evicted_steps_total", "counter", "buffer", "Steps evicted"),
    _m("buffer_evicted_groups_total", "counter", "buffer", "Groups deleted by eviction"),
    _m("buffer_samples_total", "counter", "buffer", "Batches served by Sample"),
    _m("buffer_items_sampled_total", "counter", "buffer", "Items (rollouts) served by Sample"),
    _m("buffer_abs_shortfall_total", "counter", "buffer", "Pairs ABS could not draw (§3)"),
    _m("buffer_skipped_batches_total", "counter", "buffer", "Empty batches (all weights 0)"),
    _m("buffer_redis_errors_total", "counter", "buffer", "Failed Redis calls", "op"),
    _m("buffer_groups_stored", "gauge", "buffer", "Groups held in Redis, per run", "run"),
    _m("buffer_rollouts_stored", "gauge", "buffer", "Rollouts kept by PTS held, per run", "run"),
    _m("buffer_rollout_silence_ratio", "gauge", "buffer", "Silent share of the last batch (§5)"),
    _m(
        "buffer_advantage_collapse_share",
        "gauge",
        "buffer",
        "Share of the last batch with |A| < tau (§5)",
    ),
    # --- rollout workers (Ray metrics) --------------------------------------------------------
    _m(
        "rollout_worker_requests_total",
        "counter",
        "rollout",
        "Prompts generated",
        "worker",
        "run",
    ),
    _m(
        "rollout_worker_tokens_total",
        "counter",
        "rollout",
        "Response tokens generated",
        "worker",
        "run",
    ),
    _m(
        "rollout_worker_generate_seconds",
        "histogram",
        "rollout",
        "Time of one generate call, seconds",
        "worker",
        "run",
    ),
    _m(
        "rollout_worker_weight_version",
        "gauge",
        "rollout",
        "Weight version loaded",
        "worker",
        "run",
    ),
    _m(
        "rollout_worker_weight_load_seconds",
        "histogram",
        "rollout",
        "Time to load new weights in place, seconds",
        "worker",
        "run",
    ),
    # --- reward workers (Ray metrics) ---------------------------------------------------------
    _m(
        "reward_worker_scored_total",
        "counter",
        "reward",
        "Responses scored",
        "worker",
        "run",
    ),
    _m(
        "reward_worker_errors_total",
        "counter",
        "reward",
        "Reward calls that raised, hung, died with their process or returned garbage (scored 0)",
        "worker",
        "kind",
        "run",
    ),
    _m(
        "reward_worker_seconds",
        "histogram",
        "reward",
        "Time to score one request batch, seconds",
        "worker",
        "run",
    ),
    # --- learner ranks (Ray metrics) ----------------------------------------------------------
    _m(
        "learner_worker_microbatches_total",
        "counter",
        "learner",
        "Micro-batches run (log-probs or training)",
        "rank",
        "kind",
        "run",
    ),
    _m(
        "learner_worker_tokens_total",
        "counter",
        "learner",
        "Response tokens trained on",
        "rank",
        "run",
    ),
    _m(
        "learner_worker_step_seconds",
        "histogram",
        "learner",
        "Time of one optimizer mini-batch step on a rank, seconds",
        "rank",
        "run",
    ),
)

BY_NAME: dict[str, MetricSpec] = {m.name: m for m in CATALOG}


def by_role(role: str) -> list[MetricSpec]:
    """The metrics ``role`` exports. Raises ``ValueError`` for an unknown role."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {list(ROLES)}")
    return [m for m in CATALOG if m.role == role]


def catalog_name(scraped: str) -> str:
    """A scraped sample name as the catalog spells it: Ray's ``ray_`` prefix removed from
    ``ray_shuffle_r1_*`` (as :data:`RAY_PREFIX_RELABEL` does), anything else unchanged."""
    if scraped.startswith(RAY_PREFIX + "shuffle_r1_"):
        return scraped[len(RAY_PREFIX) :]
    return scraped


def spec_of_series(series: str) -> MetricSpec | None:
    """The catalog entry a sample or query name belongs to (``_bucket``/``_sum``/``_count``
    of a histogram included), or None."""
    name = catalog_name(series)
    if name in BY_NAME:
        return BY_NAME[name]
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in BY_NAME and name in BY_NAME[base].series:
            return BY_NAME[base]
    return None
