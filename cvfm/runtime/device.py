"""The device a command runs on when none is asked for."""

from __future__ import annotations

import torch


def default_device(device: str | None = None) -> str:
    """`device` when given, else "cuda" when a GPU is there, else "cpu"."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")
