"""Resuming an output: the settings it was written with, read back and held against today's, so that a
rerun with other settings never mixes two kinds of results in one output."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from cvfm.errors import UsageError


def read_settings(path: str | Path, format: str | None = None) -> dict | None:
    """The JSON object saved at `path`, whose "format" is `format` when one is given; None when it is
    missing, unreadable or of another format."""
    try:
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or (format is not None and saved.get("format") != format):
        return None
    return saved


def check_same_settings(
    saved: dict, settings: dict, what: str, advice: str, ignore: Iterable[str] = (), shown: int = 4
) -> None:
    """A UsageError "`what` (key: X there, Y now; ...): `advice`" when a setting (the `ignore`d aside)
    differs from the saved one; the first `shown` differences are named."""
    ignore = set(ignore)
    diff = [k for k in settings if k not in ignore and saved.get(k) != settings[k]]
    if diff:
        named = "; ".join(
            f"{k}: {_short(saved.get(k))} there, {_short(settings[k])} now" for k in diff[:shown]
        )
        raise UsageError(f"{what} ({named}): {advice}")


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"
