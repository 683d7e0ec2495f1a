"""Input followed as it arrives, so that records flow while a producer (`find`, a slow pipe) still writes.

A reader thread queues the lines; the consumer takes, at each step, every line already there. It waits
only when nothing has arrived, never for a chunk to fill, so a record is never held back by input that
has not come yet.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
_END = object()


def arrived(lines: Iterable[T], limit: int) -> Iterator[list[T]]:
    """`lines` in lists of what arrived since the previous one (1 to `limit` each; the reader runs at
    most `limit` ahead). An error while reading is raised after the lines read before it."""
    waiting: queue.Queue = queue.Queue(maxsize=limit)
    failed: list[Exception] = []

    def read() -> None:
        try:
            for line in lines:
                waiting.put(line)
        except Exception as e:  # noqa: BLE001 (handed to the consumer)
            failed.append(e)
        waiting.put(_END)

    threading.Thread(target=read, name="cvfm-input", daemon=True).start()
    while True:
        chunk = [waiting.get()]
        while chunk[-1] is not _END and len(chunk) < limit:
            try:
                chunk.append(waiting.get_nowait())
            except queue.Empty:
                break
        ended = chunk[-1] is _END
        if ended:
            chunk.pop()
        if chunk:
            yield chunk
        if ended:
            if failed:
                raise failed[0]
            return
