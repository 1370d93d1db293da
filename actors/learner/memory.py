"""A learner rank's peak memory per micro-batch (``LearnerWorker.train_step``'s log)."""

from __future__ import annotations

import resource

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak for :func:`peak_memory_mb`: CUDA's allocator peak, or on CPU the
    process's peak resident set (``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``,
    Linux >= 4.0; elsewhere the peak since the process started stays)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    """MiB at the peak since :func:`reset_peak_memory`: CUDA's allocated bytes, or the CPU
    process's resident set (``VmHWM`` of ``/proc/self/status``; ``ru_maxrss``, the peak
    since start, where /proc is absent)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
