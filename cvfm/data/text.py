"""Text files that users write, read alike everywhere: UTF-8 with or without the byte-order mark that
Windows editors and Excel put first, with Unix or Windows line endings, blank lines ignored by callers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

ENCODING = "utf-8-sig"  # reads plain UTF-8 too; drops a leading byte-order mark
BOM = "\ufeff"


def read_lines(path: str | Path) -> list[str]:
    """The lines of a small text file ("-": standard input), without line endings."""
    if str(path) == "-":
        return [line.rstrip("\r\n") for line in stdin_lines()]
    return Path(path).read_text(encoding=ENCODING).splitlines()


def stdin_lines() -> Iterator[str]:
    """Standard input's lines as they arrive (a byte-order mark at its start dropped)."""
    return without_bom(sys.stdin)


def without_bom(lines: Iterable[str]) -> Iterator[str]:
    """`lines` with a byte-order mark removed from the first one."""
    lines = iter(lines)
    for first in lines:
        yield first.removeprefix(BOM)
        break
    yield from lines


def own_stdin(binary: bool = False) -> IO:
    """Standard input as a file object of its own (on a duplicate descriptor), for a reader thread: a
    thread blocked reading `sys.stdin` holds its lock, and every process forked meanwhile (DataLoader
    workers) would hang closing its copy of `sys.stdin`. Text is decoded as ENCODING, and bytes that are
    not UTF-8 kept as surrogate escapes, as in file names."""
    fd = os.dup(sys.stdin.fileno())
    if binary:
        return open(fd, "rb")
    return open(fd, encoding=ENCODING, errors="surrogateescape")
