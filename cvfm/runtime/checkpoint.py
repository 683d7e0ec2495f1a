"""Checkpoints: model state as safetensors, optimizer state as a weights-only torch file, a JSON cursor.

Each checkpoint is written to a temporary folder and renamed into place, so a kill leaves either
the previous checkpoint or the new one, never half of one. Only the newest `keep` are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def save_checkpoint(
    folder: Path, step: int, model: torch.nn.Module, optimizer, scaler, state: dict, keep: int = 2
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{step:08d}"
    tmp = folder / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(_untie(tensors), tmp / "model.safetensors")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(folder.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _untie(tensors: dict) -> dict:
    """safetensors refuses shared storage (tied weights): give each entry its own copy."""
    seen, out = set(), {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
        out[k] = v.clone() if key in seen else v
        seen.add(key)
    return out


def latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in folder.glob(f"{PREFIX}*") if (p / "state.json").exists())
    return found[-1] if found else None


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scaler) -> dict:
    model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    return json.loads((path / "state.json").read_text())
