"""Image sources: one indexable face over a folder, a JSONL manifest, a Hugging Face dataset, a built-in set.

A source lists its items up front (cheap: paths, row numbers) and decodes one image on demand, so a
missing or corrupt file costs only that item. Problems found while listing (a malformed JSONL line)
are kept in `skipped` so a run summary can name them; with `strict=True` they raise instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cvfm.data.decode import DecodeError, decode_image
from cvfm.errors import CvfmError, UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
SPLITS_NOTE = "a split selects a sub-folder, a JSONL 'split' field, an HF split or a built-in split"


class DataError(CvfmError):
    """Bad data found while reading a source (with --strict, or when nothing is left to use)."""


@dataclass(frozen=True)
class Item:
    """One image: a stable id, a label index (-1 when unknown) and where to read it from."""

    id: str
    label: int
    ref: Any


@dataclass
class ImageSource:
    """A sized list of images with optional labels; `load(i)` decodes item i to RGB."""

    name: str
    items: list[Item]
    classes: list[str] | None = None
    skipped: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.array([it.label for it in self.items], dtype=np.int64)

    @property
    def has_labels(self) -> bool:
        return len(self.items) > 0 and bool((self.labels >= 0).all())

    def load(self, i: int) -> Image.Image:
        return decode_image(self.items[i].ref)

    def describe(self) -> dict:
        return {"name": self.name, "images": len(self), "classes": self.classes, "skipped": self.skipped}


@dataclass
class ArraySource(ImageSource):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, C): the built-in sets."""

    pixels: np.ndarray | None = None

    def load(self, i: int) -> Image.Image:
        return decode_image(Image.fromarray(self.pixels[self.items[i].ref]))


@dataclass
class HFSource(ImageSource):
    """Rows of a Hugging Face `datasets.Dataset`; the image column holds PIL images, bytes or paths."""

    dataset: Any = None
    image_column: str = "image"

    def load(self, i: int) -> Image.Image:
        value = self.dataset[self.items[i].ref][self.image_column]
        if isinstance(value, dict):  # undecoded Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if value is None:
            raise DecodeError("empty image cell")
        return decode_image(value)


def open_source(
    spec: str,
    *,
    split: str | None = None,
    image_column: str = "image",
    label_column: str | None = None,
    strict: bool = False,
) -> ImageSource:
    """Open a data spec: `builtin:<name>`, `hf:<name-or-path>`, a `.jsonl` manifest or an image folder.

    `split` is optional: it selects a sub-folder, a JSONL 'split' field, an HF split or a
    built-in split. An empty result is a usage error.
    """
    if spec.startswith("builtin:"):
        from cvfm.data.builtin import open_builtin

        source = open_builtin(spec.removeprefix("builtin:"), split=split)
    elif spec.startswith("hf:"):
        source = _open_hf(spec.removeprefix("hf:"), split, image_column, label_column)
    else:
        path = Path(spec)
        if not path.exists():
            raise UsageError(
                f"data source '{spec}' does not exist (expected a folder, a .jsonl file, "
                "builtin:<name> or hf:<dataset>)"
            )
        if path.is_dir():
            source = _open_folder(path, split)
        elif path.suffix == ".jsonl":
            source = _open_jsonl(path, split, strict)
        else:
            raise UsageError(f"data source '{spec}' is a file but not a .jsonl manifest")
    if len(source) == 0:
        where = f" (split '{split}')" if split else ""
        raise UsageError(f"data source '{spec}'{where} holds no images")
    return source


def _open_folder(root: Path, split: str | None) -> ImageSource:
    if split is not None:
        if not (root / split).is_dir():
            raise UsageError(f"folder '{root}' has no '{split}' sub-folder ({SPLITS_NOTE})")
        root = root / split
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    class_dirs = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    index = {c: i for i, c in enumerate(class_dirs)}
    items = []
    for p in files:
        rel = p.relative_to(root)
        label = index[rel.parts[0]] if len(rel.parts) > 1 else -1
        items.append(Item(id=rel.as_posix(), label=label, ref=str(p)))
    return ImageSource(name=str(root), items=items, classes=class_dirs or None)


def _open_jsonl(path: Path, split: str | None, strict: bool) -> ImageSource:
    """Read `{"id", "image", "label", "split"?}` lines; image paths are relative to the manifest."""
    rows, skipped, class_names = [], [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
                    raise ValueError('expected an object with a string "image" field')
                label = rec.get("label")
                label = -1 if label is None else label
                if isinstance(label, float) and label.is_integer():
                    label = int(label)
                if isinstance(label, bool) or not isinstance(label, (int, str)):
                    raise ValueError('"label" must be an integer or a string')
            except ValueError as e:
                problem = {"where": f"{path}:{lineno}", "reason": f"malformed JSONL line: {e}"}
                if strict:
                    raise DataError(f"{problem['where']}: {problem['reason']}") from None
                skipped.append(problem)
                continue
            if isinstance(label, str):  # names of every split, so train and test share one mapping
                class_names.add(label)
            if split is not None and rec.get("split") != split:
                continue
            image = Path(rec["image"])
            ref = str(image if image.is_absolute() else path.parent / image)
            rows.append((str(rec.get("id", f"{path.name}:{lineno}")), label, ref))
    if split is not None and not rows:
        raise UsageError(f'manifest \'{path}\' has no lines with "split": "{split}" ({SPLITS_NOTE})')
    classes = sorted(class_names) or None  # sorted, like class sub-folders
    index = {c: i for i, c in enumerate(classes or [])}
    items = [Item(id=i, label=index[lab] if isinstance(lab, str) else lab, ref=ref) for i, lab, ref in rows]
    return ImageSource(name=str(path), items=items, classes=classes, skipped=skipped)


def _open_hf(name: str, split: str | None, image_column: str, label_column: str | None) -> HFSource:
    import datasets

    try:
        local = Path(name)
        if (local / "dataset_dict.json").exists() or (local / "dataset_info.json").exists():
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        raise UsageError(f"cannot open Hugging Face dataset '{name}': {_first_line(e)}") from None
    if isinstance(ds, datasets.DatasetDict):
        split = split or ("train" if "train" in ds else next(iter(ds)))
        if split not in ds:
            raise UsageError(f"dataset '{name}' has no split '{split}' (it has: {', '.join(ds)})")
        ds = ds[split]
    elif split is not None:  # a lone Dataset has no splits: never hand back all rows as 'test'
        raise UsageError(
            f"dataset '{name}' is a single Dataset without splits, so it has no split '{split}' "
            "(leave the split out)"
        )
    columns = list(ds.column_names)
    if image_column not in columns:
        raise UsageError(
            f"dataset '{name}' has no image column '{image_column}' (columns: {', '.join(columns)})"
        )
    explicit = label_column is not None
    label_column = label_column or "label"
    if label_column not in columns:
        if explicit:
            raise UsageError(
                f"dataset '{name}' has no label column '{label_column}' (columns: {', '.join(columns)})"
            )
        labels, classes = [-1] * len(ds), None
    else:
        feature = ds.features[label_column]
        classes = list(getattr(feature, "names", None) or []) or None
        values = ds[label_column]
        if values and all(isinstance(v, str) for v in values):  # string labels: sorted class names
            classes = sorted(set(values))
            labels = [classes.index(v) for v in values]
        else:
            labels = [-1 if v is None else int(v) for v in values]
    items = [Item(id=f"{name}:{split or ''}:{i}", label=labels[i], ref=i) for i in range(len(ds))]
    return HFSource(name=name, items=items, classes=classes, dataset=ds, image_column=image_column)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def subset(source: ImageSource, indices: Sequence[int]) -> ImageSource:
    """A view of `source` restricted to `indices` (same loader, same classes)."""
    import copy

    view = copy.copy(source)
    view.items = [source.items[i] for i in indices]
    return view
