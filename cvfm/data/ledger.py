"""Reading the deletion ledger (`cvfm.unlearn.ledger` writes it): its entries, and the ids it has forgotten,
which every training run given `--ledger` leaves out.

A JSONL file, one forget request a line; a line cut by a crash is reported and skipped, a missing file is
an empty ledger.
"""

from __future__ import annotations

import json
from pathlib import Path

from cvfm.console import log
from cvfm.data.text import ENCODING
from cvfm.errors import UsageError


def check_ledger_path(path: Path) -> None:
    """A ledger is a file (or not there yet)."""
    if path.exists() and not path.is_file():
        raise UsageError(f"ledger '{path}' is not a file")


def ledger_entries(path: str | Path) -> list[dict]:
    """Every readable entry, oldest first (a missing file is an empty ledger)."""
    path = Path(path)
    check_ledger_path(path)
    if not path.exists():
        return []
    out = []
    with open(path, encoding=ENCODING) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                if not isinstance(entry, dict) or "request_id" not in entry:
                    raise ValueError("not a ledger entry")
            except ValueError as e:
                log(f"ledger {path}:{lineno} is unreadable ({e}); ignored")
                continue
            out.append(entry)
    return out


def forgotten_ids(path: str | Path) -> set[str]:
    """Every id forgotten by any request in the ledger at `path`."""
    return {i for e in ledger_entries(path) for i in e.get("forget_ids", [])}
