"""The deletion ledger: an append-only JSONL record of every forget request carried out.

One line per request: its id, time, the forgotten ids and their sha256, method, settings, seed, the
sha256 of the model before and after, and the audit metrics. Lines are only ever appended (one write,
flushed and fsynced); a line cut by a crash is reported and ignored, never rewritten. Training runs given
the ledger (`pretrain` / `finetune --ledger`, `unlearn --method retrain`) leave every forgotten id out.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path

from cvfm.data.ledger import check_ledger_path, forgotten_ids, ledger_entries
from cvfm.errors import CvfmError


class Ledger:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_ledger_path(self.path)

    def entries(self) -> list[dict]:
        """Every readable entry, oldest first (a missing file is an empty ledger)."""
        return ledger_entries(self.path)

    def find(self, request_id: str) -> dict | None:
        """The entry of `request_id`, if it was carried out."""
        return next((e for e in self.entries() if e["request_id"] == request_id), None)

    def forgotten_ids(self) -> set[str]:
        """Every id forgotten by any request in this ledger."""
        return forgotten_ids(self.path)

    def append(self, entry: dict) -> dict:
        """Add one entry (with its time); a request id already present is refused."""
        if self.find(entry["request_id"]) is not None:
            raise CvfmError(f"request '{entry['request_id']}' is already in the ledger {self.path}")
        entry = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **entry}
        line = json.dumps(entry, sort_keys=True, default=str) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            if f.tell() > 0:  # a crash may have cut the last line: start ours on a fresh one
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
            f.write(line.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        return entry


def model_digest(folder: str | Path) -> str:
    """sha256 over a model folder's weight and config files (relative names and bytes, sorted)."""
    folder = Path(folder)
    files = sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix in (".safetensors", ".json") and not _hidden(p, folder)
    )
    if not files:
        raise CvfmError(f"no model files under '{folder}'")
    h = hashlib.sha256()
    for p in files:
        h.update(p.relative_to(folder).as_posix().encode() + b"\0")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)
