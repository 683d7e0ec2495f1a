"""Checkpoints: model state as safetensors, optimizer state as a weights-only torch file, a JSON cursor.

Each checkpoint is written to a temporary folder, its files and the folder synced to disk, and renamed
into place, so a kill (or a power cut) leaves either the previous checkpoint or the new one, never half
of one. Only the newest `keep` are kept. A checkpoint that cannot be read whole all the same (a file
truncated or missing) is skipped, with a warning, for the one before it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cvfm.runtime.files import fsync_path
from cvfm.runtime.progress import log

PREFIX = "step-"
FILES = ("model.safetensors", "optimizer.pt", "state.json")  # scaler.pt: with a gradient scaler only


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
    for f in tmp.iterdir():
        fsync_path(f)
    fsync_path(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_path(folder)
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


def checkpoints(folder: Path) -> list[Path]:
    """The checkpoint folders in `folder`, oldest first."""
    return sorted(p for p in folder.glob(f"{PREFIX}*") if p.is_dir())


def latest_checkpoint(folder: Path) -> Path | None:
    found = [p for p in checkpoints(folder) if (p / "state.json").exists()]
    return found[-1] if found else None


def read_checkpoint(path: Path) -> dict:
    """Every part of the checkpoint at `path`, read whole: {"model", "optimizer", "scaler", "state"}.
    Raises (OSError, ValueError, RuntimeError, ...) when a part is missing or cannot be read."""
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"missing {', '.join(missing)}")
    state = json.loads((path / "state.json").read_text())
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("state.json holds no step")
    scaler = path / "scaler.pt"
    return {
        "model": load_file(path / "model.safetensors"),
        "optimizer": torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu"),
        "scaler": torch.load(scaler, weights_only=True) if scaler.exists() else None,
        "state": state,
    }


def read_latest_checkpoint(folder: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint in `folder` that reads whole, and its parts (`read_checkpoint`); newer ones
    that do not are skipped with a warning. None when there is none."""
    for path in reversed(checkpoints(folder)):
        try:
            return path, read_checkpoint(path)
        except Exception as e:  # noqa: BLE001 (any failure to read makes this checkpoint unusable)
            log(f"warning: skipping checkpoint {path}: it cannot be read ({type(e).__name__}: {e})")
    return None


def apply_checkpoint(parts: dict, model: torch.nn.Module, optimizer, scaler) -> dict:
    """Load the parts read by `read_checkpoint` into the model, optimizer and scaler; returns the state."""
    model.load_state_dict(parts["model"], strict=True)
    optimizer.load_state_dict(parts["optimizer"])
    if scaler is not None and parts["scaler"] is not None:
        scaler.load_state_dict(parts["scaler"])
    return parts["state"]
