"""A torch Dataset over an ImageSource that never crashes on a bad image, and its collate function.

Each sample's augmentation randomness is seeded by (seed, epoch, index), so a sample gets the same
views whichever worker decodes it and whether or not the run was interrupted and resumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, default_collate

from cvfm.data.decode import DecodeError
from cvfm.data.sources import DataError, ImageSource


@dataclass(frozen=True)
class Skipped:
    index: int
    where: str
    reason: str


class ImageDataset(Dataset):
    """Yields `{"image": tensor or [views], "size": (height, width) as decoded, "label", "index"}` plus
    `"text"` and `"target"` when the item has them (no `"image"` or `"size"` for a text-only source), or a
    `Skipped` for an unreadable item. The original size maps outputs back onto the image (masks, boxes)."""

    def __init__(self, source: ImageSource, transform: Callable | None, seed: int | None = None):
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, 0

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        item = self.source.items[i]
        sample = {"label": item.label, "index": i}
        if item.text is not None:
            sample["text"] = item.text
        if item.target is not None:
            sample["target"] = item.target
        if not self.source.has_images:
            return sample
        try:
            img = self.source.load(i)
        except DecodeError as e:
            return Skipped(i, str(item.ref) if isinstance(item.ref, str) else item.id, str(e))
        if self.seed is None:
            image = self.transform(img)
        else:
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed also queues a seed for every accelerator
                # backend with a formatted stack trace, a third of a millisecond per sample in a worker.
                torch.default_generator.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
                image = self.transform(img)
        return {"image": image, "size": torch.tensor([img.height, img.width]), **sample}


def collate(batch: list, tokenizer: Callable | None = None) -> dict:
    """Stack the good samples; report the skipped ones under "skipped". Texts stay a list of strings
    (or of caption tuples), targets a list; `tokenizer(texts)` adds their "tokens" (use
    `functools.partial`)."""
    good = [b for b in batch if not isinstance(b, Skipped)]
    texts = [b.pop("text") for b in good if "text" in b]
    targets = [b.pop("target") for b in good if "target" in b]
    out = default_collate(good) if good else {"image": None, "label": None, "index": None}
    if good and texts:
        out["text"] = texts
        if tokenizer is not None:
            out["tokens"] = tokenizer(texts)
    if good and targets:
        if len(targets) != len(good):
            raise DataError("some items of a batch have a target and some have none")
        out["target"] = targets
    out["skipped"] = [b for b in batch if isinstance(b, Skipped)]
    return out


class SkipLog:
    """Collects skipped items across batches (once each) and enforces --strict."""

    def __init__(self, strict: bool = False, earlier: list[dict] | None = None):
        self.strict = strict
        self.entries: dict[str, str] = {}
        self.add_entries(earlier or [])

    def add_entries(self, entries: list[dict]) -> None:
        """Problems found before decoding (malformed lines, earlier runs' rejects): {"where", "reason"}."""
        for e in entries:
            self.entries.setdefault(e["where"], e["reason"])

    def add(self, skipped: list[Skipped]) -> None:
        for s in skipped:
            if self.strict:
                raise DataError(f"{s.where}: {s.reason}")
            self.entries.setdefault(s.where, s.reason)

    def as_list(self) -> list[dict]:
        return [{"where": w, "reason": r} for w, r in self.entries.items()]
