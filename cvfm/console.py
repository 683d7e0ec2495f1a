"""The stderr console: lines for humans (logs, warnings), kept apart from the data on stdout."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True)


def log(message: str) -> None:
    """A line for humans, on stderr (as is: never wrapped, brackets kept, so a long path stays greppable)."""
    console.print(message, highlight=False, markup=False, soft_wrap=True)
