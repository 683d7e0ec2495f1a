"""CPU thread budget: DataLoader workers and torch's intra-op threads must not oversubscribe the cores."""

from __future__ import annotations

import os

import torch


def share_cores_with_workers(num_workers: int) -> int:
    """For a CPU run (the caller decides), give torch the cores the decoding workers leave free, unless
    OMP_NUM_THREADS is set.

    On a 2-core machine with 2 workers, torch's default of 2 threads made a training step 2-8x slower.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores - num_workers)
    torch.set_num_threads(threads)
    return threads
