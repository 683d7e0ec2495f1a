"""A run folder: run.json, metrics.jsonl, checkpoints/, backbone/, curves.png, and data_items.jsonl (the
digest of the training items, `cvfm.data.digest`).

An existing non-empty folder is refused unless the caller asks to overwrite or to resume it.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import fields, replace
from pathlib import Path

import cvfm
from cvfm.data.digest import DIGEST_FILE, Entry, digest_file, digest_items, parse_digest
from cvfm.data.sources import ImageSource
from cvfm.errors import UsageError
from cvfm.runtime.files import write_json, write_text


class RunDir:
    """Checks on construction (touching nothing); `create()` clears (with overwrite) and makes it."""

    def __init__(self, path: str | Path, *, overwrite: bool = False, resume: bool = False):
        self.path, self.overwrite, self.resume = Path(path), overwrite, resume
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"output '{self.path}' is a file, not a folder")
        if resume:
            if not self.run_json.exists():
                raise UsageError(f"cannot resume: '{self.path}' is not a cvfm run folder (no run.json)")
        elif self._occupied() and not overwrite:
            raise UsageError(
                f"output folder '{self.path}' exists and is not empty: pass --overwrite to "
                "replace it or --resume to continue it"
            )

    def _occupied(self) -> bool:
        return self.path.exists() and any(self.path.iterdir())

    def create(self) -> RunDir:
        if not self.resume and self._occupied():
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def backbone(self) -> Path:
        return self.path / "backbone"

    def read(self) -> dict:
        return json.loads(self.run_json.read_text())

    def update(self, **fields) -> dict:
        record = self.read() if self.run_json.exists() else {}
        record.update(fields)
        write_json(self.run_json, record)
        return record

    def record_data(self, source: ImageSource) -> dict:
        """Hash the training items of `source` into data_items.jsonl and run.json's "data_digest"."""
        t0 = time.perf_counter()
        return self.save_digest(digest_items(source), seconds=time.perf_counter() - t0)

    def save_digest(self, entries: list[Entry], seconds: float | None = None) -> dict:
        """Write `entries` as this run's training items (data_items.jsonl, run.json's "data_digest")."""
        text, record = digest_file(entries)
        write_text(self.path / DIGEST_FILE, text)
        if seconds is not None:
            record["seconds"] = round(seconds, 3)
        self.update(data_digest=record)
        return record

    def read_digest(self) -> list[Entry] | None:
        """The training items this run recorded; None when it predates digests. A DataError when
        data_items.jsonl is missing or is not the file run.json describes."""
        record = self.read().get("data_digest")
        return None if record is None else parse_digest(self.path / DIGEST_FILE, record)


def resumed_config(cfg, command: str):
    """With `cfg.resume`, the config the run folder `cfg.output` saved (run.json "config") as a `type(cfg)`,
    with `resume` on and the number of workers changed only where `cfg` names one; else `cfg` with the
    default number of workers (2). `command` names the command that writes such runs, for the error."""
    if not cfg.resume:
        return cfg if cfg.num_workers is not None else replace(cfg, num_workers=2)
    saved = RunDir(cfg.output, resume=True).read().get("config")
    names = {f.name: f for f in fields(cfg)}
    if not isinstance(saved, dict) or not set(saved) <= set(names):
        raise UsageError(f"cannot resume: '{cfg.output}' is not a run of {command}")
    tuples = {k: tuple(v) for k, v in saved.items() if isinstance(getattr(cfg, k), tuple)}  # JSON lists
    workers = saved.get("num_workers") if cfg.num_workers is None else cfg.num_workers
    return type(cfg)(**{**saved, **tuples, "resume": True, "num_workers": workers})


def versions() -> dict:
    """Library versions recorded in run.json."""
    import accelerate
    import timm
    import torch
    import transformers

    return {
        "cvfm": cvfm.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
    }
