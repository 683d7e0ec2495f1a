"""Exact duplicates: items whose images are stored as the same bytes (a file's bytes; a built-in image's
pixel array; a dataset cell), found by SHA-256. Built-in and hf: data are reopened from the embed's data
spec to read them; files are read from the pool's image paths."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from cvfm.curate.decisions import in_memory
from cvfm.curate.pool import EmbeddingPool


def content_hashes(pool: EmbeddingPool) -> tuple[list[str | None], dict[int, str]]:
    """Each row's SHA-256 (None where the image cannot be read) and, for those rows, why not."""
    read = _in_memory_reader(pool) if in_memory(pool) else _read_file
    hashes: list[str | None] = []
    problems: dict[int, str] = {}
    for row, (image, item_id) in enumerate(zip(pool.column("image"), pool.ids, strict=True)):
        data, problem = read(image, item_id)
        hashes.append(None if data is None else hashlib.sha256(data).hexdigest())
        if problem:
            problems[row] = problem
    return hashes, problems


def first_copies(hashes: list[str | None]) -> np.ndarray:
    """For each row, the first row with the same hash (itself when it is the first; -1 without a hash)."""
    first: dict[str, int] = {}
    return np.array([-1 if h is None else first.setdefault(h, i) for i, h in enumerate(hashes)], np.int64)


def _read_file(image: str, item_id: str) -> tuple[bytes | None, str | None]:
    try:
        return Path(image).absolute().read_bytes(), None
    except OSError as e:
        return None, f"{e.strerror or type(e).__name__}: {image}"


def _in_memory_reader(pool: EmbeddingPool):
    """Read rows by id from the embed's data spec, opened again."""
    from cvfm.data.sources import open_source

    c = pool.config
    image_column = c.get("image_column") or "image"
    source = open_source(
        c["data"], split=c.get("split"), image_column=image_column, label_column=c.get("label_column")
    )
    index = {it.id: i for i, it in enumerate(source.items)}

    def read(image: str, item_id: str) -> tuple[bytes | None, str | None]:
        if item_id not in index:
            return None, f"not in {c['data']} any more"
        data = source.content(index[item_id])
        return data, None if data is not None else "no stored image"

    return read
