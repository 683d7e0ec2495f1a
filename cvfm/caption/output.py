"""Where captions go: a resumable JSON-lines file with its settings sidecar and rejects file, or stdout."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cvfm.data.sources import ImageSource
from cvfm.errors import UsageError
from cvfm.runtime.files import write_json
from cvfm.runtime.progress import log
from cvfm.runtime.settings import check_same_settings, read_settings

SETTINGS_SUFFIX = ".json"
REJECTS_SUFFIX = ".rejects"
UNCOMPARED = ("cvfm_version",)


class CaptionFile:
    """A caption file `path`, its settings sidecar and its rejects file (see the module docstring)."""

    def __init__(self, path: str | Path, settings: dict):
        self.path = Path(path)
        self.settings_path = Path(f"{path}{SETTINGS_SUFFIX}")
        self.rejects_path = Path(f"{path}{REJECTS_SUFFIX}")
        self.settings = settings
        self.rejects: list[dict] = []  # those found by earlier runs (on resume)

    def open(self, overwrite: bool) -> set[str]:
        """Check what is there and make the files ready to append; return the ids already done."""
        if self.path.is_dir():
            raise UsageError(
                f"output '{self.path}' is a folder: captions go to a .jsonl file (or - for stdout)"
            )
        if self.path.exists() and self.path.stat().st_size > 0 and not overwrite:
            saved = read_settings(self.settings_path)
            if saved is None:
                raise UsageError(
                    f"output '{self.path}' exists and was not written by cvfm caption (no "
                    f"{self.settings_path.name}): use --overwrite to replace it"
                )
            check_same_settings(
                saved,
                self.settings,
                f"output '{self.path}' holds captions made with other settings",
                "use the same settings to resume, --overwrite to replace it, or another -o",
                ignore=UNCOMPARED,
            )
            return self._resume()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.settings_path, self.settings)
        self.path.write_text("", encoding="utf-8")
        self.rejects_path.unlink(missing_ok=True)
        return set()

    def _resume(self) -> set[str]:
        done = {r["id"] for r in self._repair(self.path)}
        if self.rejects_path.exists():
            self.rejects = self._repair(self.rejects_path)
        return done | {r["id"] for r in self.rejects}

    @staticmethod
    def _repair(path: Path) -> list[dict]:
        """The complete records of a JSON-lines file; a truncated or unreadable tail is cut off."""
        data = path.read_bytes()
        records, keep = [], 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                record = json.loads(line)
            except ValueError:
                break
            if not isinstance(record, dict) or "id" not in record:
                break
            records.append(record)
            keep += len(line)
        if keep < len(data):
            log(f"caption: dropping {len(data) - keep} bytes of an incomplete last line of '{path}'")
            with open(path, "r+b") as f:
                f.truncate(keep)
        return records

    def write(self, rows: list[dict], rejects: list[dict], done: set[str]) -> int:
        """Append this batch's rejects then its captions (each file flushed and fsynced)."""
        new_rejects = [r for r in rejects if r["id"] not in done]
        if new_rejects:
            _append(self.rejects_path, new_rejects)
        if rows:
            _append(self.path, rows)
        done.update(r["id"] for r in [*rows, *new_rejects])
        return len(rows)


def _append(path: Path, records: list[dict]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def stdout_writer() -> Callable[[list[dict], list[dict], set[str]], int]:
    def write(rows: list[dict], rejects: list[dict], done: set[str]) -> int:
        for r in rows:
            sys.stdout.write(json.dumps(r, ensure_ascii=False) + "\n")
        sys.stdout.flush()
        return len(rows)

    return write


def record(source: ImageSource, i: int, caps: list[str], num_captions: int) -> dict:
    item = source.items[i]
    record = {"id": item.id, "image": item.ref if isinstance(item.ref, str) else item.id}
    if num_captions == 1:
        record["caption"] = caps[0]
    else:
        record["captions"] = list(caps)
    return record


def reject(source: ImageSource, i: int, reason: str) -> dict:
    item = source.items[i]
    return {"id": item.id, "image": item.ref if isinstance(item.ref, str) else item.id, "reason": reason}
