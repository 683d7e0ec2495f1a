"""`--cache-teacher DIR`: the teacher's outputs on disk, one safetensors file per view, keyed by the SHA-256
of the view's pixels and of the teacher's identity, so later epochs (and later runs with the same teacher
and data) skip the teacher. Only for fixed views (`--no-augment`): a random crop never repeats."""

from __future__ import annotations

import hashlib
import os
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cvfm.distill.teacher import TeacherOutput

TENSORS = [f.name for f in fields(TeacherOutput) if f.name != "grid"]


class TeacherCache:
    """`cache(teacher, x)`: `teacher(x)`, with the rows already on disk read instead of computed."""

    def __init__(self, folder: str | Path, identity: str):
        self.folder, self.identity = Path(folder), identity.encode()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def key(self, view: torch.Tensor) -> Path:
        digest = hashlib.sha256(self.identity + view.detach().float().cpu().contiguous().numpy().tobytes())
        return self.folder / f"{digest.hexdigest()}.safetensors"

    def __call__(self, teacher, x: torch.Tensor) -> TeacherOutput:
        paths = [self.key(v) for v in x]
        rows = [load_file(p) if p.is_file() else None for p in paths]
        missing = [i for i, r in enumerate(rows) if r is None]
        self.hits, self.misses = self.hits + len(x) - len(missing), self.misses + len(missing)
        grid = None
        if missing:
            out = teacher(x[missing])
            grid = out.grid
            for j, i in enumerate(missing):
                rows[i] = {k: getattr(out, k)[j].cpu() for k in TENSORS if getattr(out, k) is not None}
                if grid is not None:
                    rows[i]["grid"] = torch.tensor(grid)
                _save(rows[i], paths[i])
        if grid is None and "grid" in rows[0]:
            grid = tuple(int(v) for v in rows[0]["grid"])
        stack = lambda k: torch.stack([r[k] for r in rows]).to(x.device) if k in rows[0] else None  # noqa: E731
        return TeacherOutput(**{k: stack(k) for k in TENSORS}, grid=grid)


def _save(tensors: dict, path: Path) -> None:
    """Written whole or not at all (a temporary file renamed), so a killed run leaves no torn entry."""
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)
