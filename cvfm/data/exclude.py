"""Leaving ids out of a training source: a file of ids (`--exclude`) and the ids a deletion ledger has
forgotten (`--ledger`), so that a later pre-training or fine-tuning run never sees forgotten data.

What was left out is recorded in run.json as a count and a SHA-256 of the sorted ids (never the ids
themselves): enough to check that two runs excluded the same items.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from cvfm.console import log
from cvfm.data.ledger import forgotten_ids
from cvfm.data.sources import ImageSource, subset
from cvfm.data.text import read_lines
from cvfm.errors import UsageError


def read_ids(path: str) -> list[str]:
    """The ids listed in `path`: a text file (one id per line), a `.jsonl` file (each line's "id"), or
    "-" for standard input (JSONL when its first line is a JSON object). Blank lines are ignored."""
    if path == "-":
        name, jsonl = "<stdin>", None
    else:
        file = Path(path)
        if not file.is_file():
            raise UsageError(f"ids file '{path}' does not exist (expected one id per line, or a .jsonl file)")
        name, jsonl = path, file.suffix == ".jsonl"
    ids = []
    for lineno, line in enumerate(read_lines(path), start=1):
        line = line.strip()
        if not line:
            continue
        if jsonl is None:  # stdin: the first line decides
            jsonl = line.startswith("{")
        ids.append(_jsonl_id(line, f"{name}:{lineno}") if jsonl else line)
    return ids


def _jsonl_id(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    value = record.get("id") if isinstance(record, dict) else None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise UsageError(f'{where}: expected a JSON object with a string "id" field')
    return str(value)


def excluded_ids(exclude: str | None, ledger: str | None) -> set[str]:
    """The ids in the file `exclude` and those forgotten in the deletion `ledger` (a ledger file that
    does not exist yet has forgotten nothing)."""
    ids = set(read_ids(exclude)) if exclude else set()
    if ledger and not Path(ledger).exists():
        log(f"ledger '{ledger}' does not exist yet: it has forgotten nothing")
    elif ledger:
        ids |= forgotten_ids(ledger)
    return ids


def drop_ids(source: ImageSource, ids: set[str]) -> tuple[ImageSource, int]:
    """`source` without the items whose id is in `ids` (order kept), and how many were dropped."""
    if not ids:
        return source, 0
    keep = [i for i, item in enumerate(source.items) if item.id not in ids]
    return subset(source, keep), len(source) - len(keep)


def ids_sha256(ids: Iterable[str]) -> str:
    """SHA-256 of the sorted ids joined by newlines: the same set gives the same digest."""
    return hashlib.sha256("\n".join(sorted(ids)).encode("utf-8")).hexdigest()


def exclude_from(source: ImageSource, exclude: str | None, ledger: str | None) -> tuple[ImageSource, dict]:
    """Drop the ids of `exclude` and `ledger` from `source`; returns the rest and run.json's "excluded"
    record: {"count" (items dropped), "requested" (ids asked for), "sha256" (of the dropped ids),
    "exclude", "ledger"}. Leaving out every item is a usage error."""
    ids = excluded_ids(exclude, ledger)
    dropped = [item.id for item in source.items if item.id in ids]
    rest, count = drop_ids(source, ids)
    if ids and len(rest) == 0:
        raise UsageError(
            f"every item of '{source.name}' is excluded (--exclude / --ledger): nothing to train on"
        )
    record = {
        "count": count,
        "requested": len(ids),
        "sha256": ids_sha256(dropped),
        "exclude": exclude,
        "ledger": ledger,
    }
    return rest, record
