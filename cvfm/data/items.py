"""What every image source is: a list of `Item`s (id, label, where the image is, text) that decodes one
image on demand; `ArraySource` holds the images in memory (the built-in sets), `HFSource` reads the rows of
a Hugging Face dataset. `cvfm.data.sources` opens them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cvfm.data.decode import DecodeError, decode_image
from cvfm.errors import CvfmError


class DataError(CvfmError):
    """Bad data found while reading a source (with --strict, or when nothing is left to use)."""


UNLABELLED = -1  # an item's label when the data gives none (written as null)


@dataclass(frozen=True)
class Item:
    """One record: a stable id, a label index (UNLABELLED when unknown), where to read the image from
    (None for text-only records), for image-text data its text (one caption, or several), and a `target`
    other than a class when the task has one (instance masks, prompts, boxes: whatever its method reads;
    it travels to the batch unchanged, one per image)."""

    id: str
    label: int
    ref: Any
    text: str | tuple[str, ...] | None = None
    target: Any = None


@dataclass
class ImageSource:
    """A sized list of images with optional labels; `load(i)` decodes item i to RGB."""

    name: str
    items: list[Item]
    classes: list[str] | None = None
    skipped: list[dict] = field(default_factory=list)
    has_images: bool = True
    templates: tuple[str, ...] | None = None  # zero-shot prompts ("a photo of a {c}.") suited to this data

    def __len__(self) -> int:
        return len(self.items)

    @property
    def has_texts(self) -> bool:
        return len(self.items) > 0 and all(it.text is not None for it in self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.array([it.label for it in self.items], dtype=np.int64)

    @property
    def has_labels(self) -> bool:
        return len(self.items) > 0 and bool((self.labels >= 0).all())

    def load(self, i: int) -> Image.Image:
        return decode_image(self.items[i].ref)

    def label_of(self, item: Item) -> str | int | None:
        """The label as the data names it: the class name, else the integer; None when unknown."""
        if item.label == UNLABELLED:
            return None
        return self.classes[item.label] if self.classes and item.label < len(self.classes) else item.label

    def content(self, i: int) -> bytes | None:
        """Item i's image as stored, undecoded (its file's bytes), or None when there is none to read:
        what a data digest hashes (`cvfm.data.digest`)."""
        ref = self.items[i].ref
        return None if ref is None else _file_bytes(ref)

    def describe(self) -> dict:
        return {"name": self.name, "images": len(self), "classes": self.classes, "skipped": self.skipped}


@dataclass
class ArraySource(ImageSource):
    """Images held in memory as a uint8 array (N, H, W) or (N, H, W, C): the built-in sets."""

    pixels: np.ndarray | None = None

    def load(self, i: int) -> Image.Image:
        return decode_image(Image.fromarray(self.pixels[self.items[i].ref]))

    def content(self, i: int) -> bytes:
        return self.pixels[self.items[i].ref].tobytes()


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

    def content(self, i: int) -> bytes | None:
        value = self._undecoded[self.items[i].ref][self.image_column]
        if isinstance(value, dict):  # an Image feature: {"bytes": ..., "path": ...}
            value = value.get("bytes") or value.get("path")
        if isinstance(value, Image.Image):  # a column of PIL images that is not an Image feature
            value = f"{value.mode} {value.size}".encode() + value.tobytes()
        return _file_bytes(value) if isinstance(value, str) else value

    @functools.cached_property
    def _undecoded(self):
        """The dataset with its image column left as stored (an Image feature is not decoded)."""
        import datasets

        if isinstance(self.dataset.features.get(self.image_column), datasets.Image):
            return self.dataset.cast_column(self.image_column, datasets.Image(decode=False))
        return self.dataset


@dataclass
class ConcatSource(ImageSource):
    """The items of several sources one after another, each loaded by its own source: an item's `ref` is
    (source number, index in that source)."""

    parts: list[ImageSource] = field(default_factory=list)

    def load(self, i: int) -> Image.Image:
        part, j = self.items[i].ref
        return self.parts[part].load(j)

    def content(self, i: int) -> bytes | None:
        part, j = self.items[i].ref
        return self.parts[part].content(j)


def _file_bytes(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError:  # missing or unreadable: training skipped it, the digest records it as absent
        return None
