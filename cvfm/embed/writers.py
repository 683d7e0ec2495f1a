"""Where embedded batches go: whole parts into the output folder, or JSON lines on stdout."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

import numpy as np

from cvfm.data.sources import UNLABELLED, ImageSource, Item
from cvfm.embed.folder import EmbedFolder
from cvfm.embed.plan import Plan
from cvfm.runtime.progress import log


class PartWriter:
    """Fills one part's arrays batch by batch and writes them when its last batch came: at most one part
    is held, once (in the output dtype, allocated for the part's rows when its first batch arrives)."""

    def __init__(
        self,
        folder: EmbedFolder,
        source: ImageSource,
        dims: dict[str, int],
        plan: Plan,
        dtype: str = "float32",
        on_part: Callable[[int], None] | None = None,
    ):
        self.folder, self.source, self.dims, self.plan = folder, source, dims, plan
        self.dtype, self.on_part = np.dtype(dtype), on_part
        self.written: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self.rows: list[int] = []
        self.arrays: dict[str, np.ndarray] = {}

    def add(self, part: int, rows: list[int], arrays: dict[str, np.ndarray]) -> None:
        if not self.arrays:
            n = len(self.plan.rows(part))
            self.arrays = {m: np.empty((n, d), self.dtype) for m, d in self.dims.items()}
        start = len(self.rows)
        for m, a in arrays.items():
            self.arrays[m][start : start + len(rows)] = a
        self.rows.extend(rows)

    def finish(self, part: int, skipped: list[dict]) -> None:
        n = len(self.rows)
        arrays = {
            m: self.arrays[m][:n] if self.arrays else np.zeros((0, d), self.dtype)
            for m, d in self.dims.items()
        }
        columns = metadata_columns(self.source, self.rows, self.dims)
        types = {"label": "string" if self.source.classes else "int64"}  # every part alike
        self.folder.write_part(part, arrays, columns, skipped, types)
        self.written.append({"part": part, "rows": n, "skipped": skipped})
        log(f"embed: part {part}/{self.plan.num_parts} written ({n} rows, {len(skipped)} skipped)")
        self._reset()
        if self.on_part is not None:
            self.on_part(part)


class JsonLinesWriter:
    """Streams JSON lines batch by batch: the metadata of a row (`metadata_record`) and its
    `image_embedding` and/or `text_embedding`."""

    def __init__(self, source: ImageSource, stream=None, on_part: Callable[[int], None] | None = None):
        self.source, self.stream, self.on_part = source, stream, on_part
        self.written: list[dict] = []
        self._rows = 0

    def add(self, part: int, rows: list[int], arrays: dict[str, np.ndarray]) -> None:
        stream = self.stream or sys.stdout
        lists = {m: a.tolist() for m, a in arrays.items()}
        for j, i in enumerate(rows):
            record = metadata_record(self.source, self.source.items[i], lists)
            record.update({f"{m}_embedding": v[j] for m, v in lists.items()})
            stream.write(json.dumps(record) + "\n")
        stream.flush()
        self._rows += len(rows)

    def finish(self, part: int, skipped: list[dict]) -> None:
        self.written.append({"part": part, "rows": self._rows, "skipped": skipped})
        self._rows = 0
        if self.on_part is not None:
            self.on_part(part)


def metadata_record(source: ImageSource, item: Item, modalities) -> dict:
    """What describes an embedded row: id, image (its path, or the id of an in-memory image), label (the
    class name where the data names its classes, null when unknown), caption (when texts are embedded)."""
    record = {"id": item.id}
    if "image" in modalities:
        record["image"] = item.ref if isinstance(item.ref, str) else item.id
    record["label"] = source.label_of(item)
    if "text" in modalities:
        record["caption"] = item.text
    return record


def metadata_columns(source: ImageSource, rows: list[int], dims: dict[str, int]) -> dict[str, list]:
    """The `metadata_record` fields as columns, one entry per embedded row."""
    empty = Item(id="", label=UNLABELLED, ref=None)
    records = [metadata_record(source, source.items[i], dims) for i in rows]
    return {k: [r[k] for r in records] for k in metadata_record(source, empty, dims)}
