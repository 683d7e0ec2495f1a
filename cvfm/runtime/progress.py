"""Rich progress bars on stderr, silent when stderr is not a terminal (logs and CI stay clean)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from cvfm.console import console, log

__all__ = ["log", "progress"]  # log: re-exported for its many callers


@contextmanager
def progress(desc: str, total: int | None) -> Iterator[Callable[[int], None]]:
    if not sys.stderr.isatty():
        yield lambda n=1: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(desc, total=total)
        yield lambda n=1: bar.advance(task, n)
