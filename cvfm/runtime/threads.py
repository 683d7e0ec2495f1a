"""CPU thread budget: DataLoader workers and torch's intra-op threads must not oversubscribe the cores.

The number of intra-op threads changes the order of floating-point reductions (a training step on 1
thread and on 2 differ by ~1e-7, and training amplifies that), so a resumed CPU run trains with the
count its run started with (`use_threads`), whatever its number of decoding workers.
"""

from __future__ import annotations

import os

import torch

from cvfm.runtime.progress import log


def share_cores_with_workers(num_workers: int, world: int = 1) -> int:
    """For a CPU run (the caller decides), give torch this process's share of the cores (one of `world`
    processes) less one per decoding worker, unless OMP_NUM_THREADS is set; returns the thread count.

    Decoding real photos costs about as much as running a small model: on a 2-core machine with 2 workers,
    torch's default of 2 threads made a training step 2-8x slower, and with other work running, a bf16
    ViT-B/32 forward 3.5x slower than 1 thread (threads that wait for a busy core stall every op).
    """
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // world - num_workers)
    torch.set_num_threads(threads)
    return threads


def use_threads(threads: int, what: str) -> int:
    """Run on `threads` intra-op threads (those `what` started with; also on a machine with fewer cores:
    slower, but the same sums), unless OMP_NUM_THREADS asks for another count: then say that the result
    may differ from an uninterrupted run's."""
    if "OMP_NUM_THREADS" in os.environ and torch.get_num_threads() != threads:
        log(
            f"warning: {what} started on {threads} CPU thread(s) and OMP_NUM_THREADS gives "
            f"{torch.get_num_threads()}: the result may differ slightly from an uninterrupted run's "
            f"(unset OMP_NUM_THREADS or set it to {threads} for an exact resume)"
        )
        return torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads
