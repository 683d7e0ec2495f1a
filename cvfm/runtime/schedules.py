"""Per-step schedules, precomputed as arrays and indexed by the global step (so resume is exact)."""

from __future__ import annotations

import numpy as np


def cosine(
    start: float, end: float, total_steps: int, warmup_steps: int = 0, warmup_from: float = 0.0
) -> np.ndarray:
    """Linear warm-up from `warmup_from` to `start`, then cosine from `start` to `end` (DINO's utils)."""
    total_steps = max(int(total_steps), 1)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warm = np.linspace(warmup_from, start, warmup_steps, endpoint=False)
    t = np.arange(total_steps - warmup_steps)
    decay = end + 0.5 * (start - end) * (1 + np.cos(np.pi * t / max(len(t) - 1, 1)))  # ends exactly at `end`
    return np.concatenate([warm, decay])


def linear_then_constant(start: float, end: float, ramp_steps: int, total_steps: int) -> np.ndarray:
    """Linear from `start` to `end` over `ramp_steps`, then constant (DINO's teacher temperature)."""
    ramp_steps = min(max(int(ramp_steps), 0), max(int(total_steps), 1))
    ramp = np.linspace(start, end, ramp_steps, endpoint=False)
    return np.concatenate([ramp, np.full(max(int(total_steps), 1) - ramp_steps, end)])
