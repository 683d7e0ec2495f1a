"""CapFilt's files: the input lines, the output and rejects JSONL files, the settings sidecar, resume.

Every non-blank input line ends in exactly one place: a record in the output, or a reject
`{"line", "id"?, "kind": "malformed"|"image", "input": the raw line, "error"}`. Both files are keyed by
the input line number, so a rerun skips the lines already written to either (after checking they still
hold the same pair) and appends the rest. A line cut short by a kill is removed before appending.

The settings of a file output live in a sidecar, `<out stem>.capfilt.json`; a rerun with other settings
is refused unless `overwrite`.
"""

from __future__ import annotations

import codecs
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cvfm.errors import UsageError
from cvfm.runtime.files import write_json
from cvfm.runtime.settings import check_same_settings, read_settings

FORMAT = "cvfm-capfilt"
RESERVED = ("line", "captions", "scores")  # fields capfilt writes into each output record
UNCOMPARED = ("format", "cvfm_version", "input")  # recorded; a resume may differ in these


@dataclass
class Job:
    """One input line on its way: parsed (`record`, `image`, `text`) or already failed (`error`)."""

    line: int
    raw: str
    record: dict | None = None
    id: str | None = None
    image: str | None = None
    text: str | None = None
    error: str | None = None
    kind: str = "malformed"

    def reject(self) -> dict:
        out: dict = {"line": self.line}
        if self.id is not None:
            out["id"] = self.id
        return {**out, "kind": self.kind, "input": self.raw, "error": self.error}


def sidecar_path(out: str) -> Path:
    p = Path(out)
    return (
        p.with_name(p.stem + ".capfilt.json")
        if p.suffix == ".jsonl"
        else p.with_name(p.name + ".capfilt.json")
    )


def default_rejects(out: str) -> str:
    p = Path(out)
    return str(
        p.with_name(p.stem + ".rejects.jsonl")
        if p.suffix == ".jsonl"
        else p.with_name(p.name + ".rejects.jsonl")
    )


def read_lines(stream: IO[bytes]) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each non-blank line, a byte-order mark at the start dropped;
    bytes that are not UTF-8 are kept as surrogate escapes (a reject's "input" then round-trips through
    Python's json)."""
    for n, data in enumerate(stream, start=1):
        if n == 1:
            data = data.removeprefix(codecs.BOM_UTF8)
        text = data.decode("utf-8", "surrogateescape").rstrip("\r\n")
        if text.strip():
            yield n, text


def parse(n: int, raw: str, base: Path, name: str, image_column: str, text_column: str) -> Job:
    """A Job for line `n`: its record with the image path resolved against `base`, or its error."""
    job = Job(n, raw)
    try:
        rec = json.loads(raw)
    except ValueError as e:
        job.error = f"malformed JSON: {e}"
        return job
    if not isinstance(rec, dict):
        job.error = f"expected a JSON object, got {type(rec).__name__}"
        return job
    if "id" in rec:
        job.id = str(rec["id"])
    problems = []
    if not isinstance(rec.get(image_column), str) or not rec.get(image_column):
        problems.append(f'expected a string "{image_column}" field')
    if not isinstance(rec.get(text_column), str):
        found = "missing" if text_column not in rec else type(rec[text_column]).__name__
        problems.append(f'expected a string "{text_column}" field ({found})')
    clash = [k for k in RESERVED if k in rec]
    if clash:
        problems.append(f"field(s) {', '.join(clash)} are written by capfilt: rename them in the input")
    if problems:
        job.error = "; ".join(problems)
        return job
    job.id = job.id if job.id is not None else f"{name}:{n}"
    image = Path(rec[image_column])
    job.record, job.text = rec, rec[text_column]
    job.image = str(image if image.is_absolute() else base / image)
    return job


def output_record(job: Job, decided: dict) -> dict:
    """The input record (id first), its line number, the kept captions and every score."""
    rec = {"id": job.record.get("id", job.id), **{k: v for k, v in job.record.items() if k != "id"}}
    return {**rec, "line": job.line, **decided}


class Sink:
    """Appends JSON lines to a file (created on first use) or writes them to a stream."""

    def __init__(self, path: str | None, stream: IO[str] | None = None):
        self.path, self.stream, self._file = path, stream, None

    def write(self, records: list[dict]) -> None:
        if not records:
            return
        if self.stream is None and self._file is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open across batches)
        f = self.stream or self._file
        f.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
        f.flush()
        if self._file is not None:
            os.fsync(f.fileno())  # on disk before the next batch: a crash loses at most the batch in flight

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def read_done(path: str) -> dict[int, dict]:
    """The records of a JSONL file keyed by "line". A last line without its newline (a write cut short
    by a kill) is cut off the file; any other unreadable line is a usage error (the file is not ours)."""
    p = Path(path)
    if not p.exists():
        return {}
    data = p.read_bytes()
    end = data.rfind(b"\n") + 1
    done: dict[int, dict] = {}
    for i, chunk in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not chunk.strip():
            continue
        try:
            rec = json.loads(chunk.decode("utf-8", "surrogateescape"))
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("line"), int):
            raise UsageError(f"'{path}' line {i} is not a capfilt record: the file is damaged or not ours")
        done[rec["line"]] = rec
    if end < len(data):
        with open(p, "r+b") as f:
            f.truncate(end)
        print(f"capfilt: '{path}': removed a last line cut short ({len(data) - end} bytes)", file=sys.stderr)
    return done


def check_settings(out: str, rejects: str | None, settings: dict, overwrite: bool) -> str:
    """ "new", "resume" or "overwrite" for a file output; refuses other settings or a foreign file."""
    side = sidecar_path(out)
    files = [Path(out)] + ([Path(rejects)] if rejects else [])
    has_data = any(p.exists() and p.stat().st_size > 0 for p in files)
    if Path(out).is_dir():
        raise UsageError(f"--out '{out}' is a folder: capfilt writes a .jsonl file (or - for stdout)")
    if not has_data:
        return "new"
    if overwrite:
        return "overwrite"
    saved = read_settings(side, FORMAT)
    if saved is None:
        raise UsageError(
            f"'{out}' (or its rejects file) exists but has no capfilt settings file '{side}': "
            "choose another --out, or pass --overwrite to replace it"
        )
    check_same_settings(
        saved,
        settings,
        f"'{out}' was written with other settings",
        "rerun with the same settings to resume, choose another --out, or pass --overwrite to replace it",
        ignore=UNCOMPARED,
    )
    return "resume"


def start_files(out: str, rejects: str | None, settings: dict, state: str) -> None:
    """Write the sidecar; with "overwrite", empty the output and rejects files first."""
    if state == "overwrite":
        for p in (out, rejects):
            if p and Path(p).exists():
                Path(p).write_bytes(b"")
    if state != "resume":
        write_json(sidecar_path(out), {"format": FORMAT, **settings})


def check_same_pair(done: dict, rejected: bool, job: Job, out: str) -> None:
    """A done line must still hold what was written for it: the same id, or the same raw rejected line."""
    same = done.get("input") == job.raw if rejected else str(done.get("id")) == job.id
    if not same:
        raise UsageError(
            f"input line {job.line} differs from the one '{out}' holds for it (id {done.get('id')!r} "
            f"there, {job.id!r} now): the input changed; use the same input to resume, or --overwrite"
        )
