"""The learner: N Ray actors that hold one sharded policy model and train it together.

- :class:`LearnerGroup` (:mod:`actors.learner.group`): the single controller the trainer
  calls; cuts each batch into mini-batches, pair-aligned shards and micro-batches
  (docs/algorithm.md §3.4), keeps the weight version, publishes weights, saves and loads
  checkpoints, and kills every rank when one fails (:class:`LearnerFailedError`).
- :class:`LearnerWorker` (:mod:`actors.learner.worker`): one rank, a Ray actor in one
  ``torch.distributed`` process group; computes log-probs and runs micro-batches.
- :class:`Backend` (:mod:`actors.learner.backends`, one file per backend): what a rank needs
  from the library that shards it — FSDP2 or DeepSpeed ZeRO (``learner.backend``).

The math lives in :mod:`shuffle_r1.training` (batch layout, log-probs, splits) and
:mod:`shuffle_r1.algos` (policy loss); this package owns processes, devices and state.
"""

from actors.learner.backends import Backend, make_backend
from actors.learner.group import LearnerFailedError, LearnerGroup
from actors.learner.worker import LOSS_METRICS, LearnerWorker

__all__ = [
    "LOSS_METRICS",
    "Backend",
    "LearnerFailedError",
    "LearnerGroup",
    "LearnerWorker",
    "make_backend",
]
