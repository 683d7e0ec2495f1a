"""Inference precision: `--precision auto|fp32|bf16|fp16` resolved to an autocast dtype for a device.

`auto` picks the fastest precision the hardware runs natively: bf16 on a CUDA GPU that supports it
(fp16 on older GPUs), bf16 on a CPU with bf16 instructions (`avx512_bf16` or `amx_bf16`; measured on
such a CPU, a ViT-B/32 forward ran 2.6x faster under bf16 autocast than in fp32), fp32 elsewhere.
fp16 on a CPU is refused (a usage error): CPUs have no fast fp16 matrix units, so it would be slow and
less accurate than bf16; ask for bf16 or fp32 instead.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path

import torch

from cvfm.errors import UsageError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # also the training precisions


@functools.cache
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when the CPU advertises native bf16 arithmetic (Linux `/proc/cpuinfo` flags)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return bool(flags & {"avx512_bf16", "amx_bf16"})
    return False


def resolve_precision(name: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for `name` on `device`; None means plain fp32 (no autocast).

    Raises UsageError for an unknown name, fp16 on a CPU, or bf16 on a GPU without bf16 support."""
    if name not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{name}'")
    device = torch.device(device)
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        if name == "auto":
            return torch.bfloat16 if bf16_ok else torch.float16
        if name == "bf16" and not bf16_ok:
            raise UsageError("this GPU has no bf16 support: use --precision fp16 or fp32")
        return DTYPES[name]
    if device.type == "cpu":
        if name == "auto":
            return torch.bfloat16 if cpu_has_bf16() else None
        if name == "fp16":
            raise UsageError("--precision fp16 needs a GPU: on a CPU use bf16 or fp32")
        return DTYPES[name]
    # Other accelerators (mps, xpu, ...): fp32 unless a precision is asked for explicitly.
    return None if name == "auto" else DTYPES[name]


def training_precision(name: str) -> str:
    """Accelerate's `mixed_precision` for a training `--precision`: fp32, bf16 or fp16 (no auto)."""
    if name not in DTYPES:
        raise UsageError(f"--precision must be one of {', '.join(DTYPES)}, not '{name}'")
    return "no" if name == "fp32" else name


def precision_name(dtype: torch.dtype | None) -> str:
    """ "fp32", "bf16" or "fp16": the name recorded in outputs for a resolved precision."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`, or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)
