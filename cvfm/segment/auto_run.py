"""`segment_auto`: automatic masks ("segment anything") for every image of a data source, written in one of
the writers' formats, or as JSON lines on stdout.

A run folder is resumable: an image whose output is complete is skipped, a half-written one is redone (the
writers write each image atomically). Unreadable images are skipped, counted and named (`--strict`: stop).
Images are decoded within cvfm's pixel limit (no decompression bombs) and resized by the model's own
preprocessing.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from cvfm.data.decode import DecodeError
from cvfm.data.items import Item
from cvfm.data.loader import SkipLog, Skipped
from cvfm.data.sources import open_source
from cvfm.errors import UsageError
from cvfm.models.amg import AutoSettings, generate_masks_batch
from cvfm.runtime.device import default_device
from cvfm.runtime.engine import Engine, RaySession, with_engine
from cvfm.runtime.precision import autocast, precision_name, resolve_precision
from cvfm.runtime.progress import log, progress
from cvfm.segment.per_image import image_fields, output_folder, overlay
from cvfm.segment.writers import FORMATS, open_writer

OVERLAYS = "overlays"


def segment_auto(
    model: str,
    data: str,
    output: str,
    *,
    fmt: str = "amg",
    settings: AutoSettings = AutoSettings(),
    images_per_batch: int = 1,
    overlays: bool = False,
    split: str | None = None,
    image_column: str = "image",
    precision: str = "auto",
    strict: bool = False,
    overwrite: bool = False,
    pretrained: bool = True,
    trust_remote_code: bool = False,
    device: str | None = None,
    engine: Engine | str | None = None,
) -> dict:
    """Masks of every image of `data` into `output` (a folder, or "-" for one JSON line per image with its
    `id`, `image` and `masks`); returns a summary. `engine` "ray" segments on Ray (decoding as tasks, the
    model in actors; see `cvfm.runtime.engine`): the same files."""
    return with_engine(_segment_auto, locals())


def _segment_auto(
    model: str,
    data: str,
    output: str,
    *,
    fmt: str,
    settings: AutoSettings,
    images_per_batch: int,
    overlays: bool,
    split: str | None,
    image_column: str,
    precision: str,
    strict: bool,
    overwrite: bool,
    pretrained: bool,
    trust_remote_code: bool,
    device: str | None,
    session: RaySession | None,
) -> dict:
    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not '{fmt}'")
    if images_per_batch < 1:
        raise UsageError("--images-per-batch must be at least 1")
    source = open_source(data, split=split, image_column=image_column, strict=strict)
    folder = output_folder(output, overwrite)
    writer = None if folder is None else open_writer(fmt, folder)
    segmenter = _segmenter(model, pretrained, trust_remote_code)  # a bad id fails here, on any engine
    dev = torch.device(default_device(device))
    amp = session.precision(precision) if session is not None else resolve_precision(precision, dev)
    names = [output_name(it) for it in source.items]
    todo = [i for i in range(len(source)) if writer is None or not writer.done(names[i])]
    units = [todo[start : start + images_per_batch] for start in range(0, len(todo), images_per_batch)]
    load = _Load(source)
    if session is None:
        step = _Step(segmenter, dev, amp, settings, images_per_batch)
        results = ((unit, step(load(unit))) for unit in units)
    else:
        spec = (model, pretrained, trust_remote_code, precision_name(amp), settings, images_per_batch)
        results = session.map(units, load, functools.partial(_Step.load, *spec))
    skips, masks, done = SkipLog(strict), 0, 0
    with progress("segment auto", total=len(todo)) as advance:
        for unit, (batch, images, results_, skipped) in results:
            skips.add(skipped)  # raises with --strict
            for i, image, records in zip(batch, images, results_, strict=True):
                _write(writer, source.items[i], names[i], image, records, overlays, output)
                masks += len(records)
                done += 1
            advance(len(unit))
    if writer is not None:
        writer.close()
    problems = skips.as_list()
    if problems:
        log(f"segment auto: skipped {len(problems)} unreadable image(s), first: {problems[0]['where']}")
    return {
        "model": model,
        "data": data,
        "output": output,
        "format": fmt if writer is not None else "jsonl",
        "precision": precision_name(amp),
        "images": done,
        "already_done": len(source) - len(todo),
        "masks": masks,
        "skipped": problems,
        "settings": asdict(settings),
    }


def _segmenter(model: str, pretrained: bool, trust_remote_code: bool):
    from cvfm.registry import create_segmenter

    return create_segmenter(model, pretrained=pretrained, trust_remote_code=trust_remote_code)


class _Load:
    """Decode a batch of images (within cvfm's pixel limit): (rows that decoded, images, skipped)."""

    def __init__(self, source):
        self.source = source

    def __call__(self, rows: list[int]) -> tuple[list[int], list, list[Skipped]]:
        batch, images, skipped = [], [], []
        for i in rows:
            try:
                images.append(self.source.load(i))
                batch.append(i)
            except DecodeError as e:
                item = self.source.items[i]
                skipped.append(Skipped(i, str(item.ref) if isinstance(item.ref, str) else item.id, str(e)))
        return batch, images, skipped


class _Step:
    """The model half of a batch: each decoded image's mask records."""

    def __init__(self, segmenter, device, amp, settings: AutoSettings, images_per_batch: int):
        self.segmenter, self.device, self.amp = segmenter.eval().to(device), device, amp
        self.settings, self.images_per_batch = settings, images_per_batch

    @classmethod
    def load(cls, model, pretrained, trust_remote_code, precision: str, settings, images_per_batch) -> _Step:
        """On a Ray actor: the segmenter on the actor's device, at the driver's resolved precision."""
        device = torch.device(default_device())
        segmenter = _segmenter(model, pretrained, trust_remote_code)
        return cls(segmenter, device, resolve_precision(precision, device), settings, images_per_batch)

    def __call__(self, loaded: tuple) -> tuple:
        batch, images, skipped = loaded
        with autocast(self.device, self.amp):
            results = generate_masks_batch(
                self.segmenter, images, self.settings, crops_per_batch=self.images_per_batch
            )
        return batch, images, results, skipped


def output_name(item: Item) -> str:
    """The relative name an image's output is written under: its id when that is a plain relative path
    (a folder's files keep their sub-folders), else the id made safe for file names."""
    name = item.id
    parts = Path(name).parts
    if not name or Path(name).is_absolute() or ".." in parts or re.search(r"[^\w./ -]", name):
        name = re.sub(r"[^\w.-]+", "_", name).strip("._") or "image"
    return name


def _write(writer, item: Item, name: str, image, records: list[dict], overlays: bool, output: str) -> None:
    if writer is None:
        sys.stdout.write(json.dumps({**image_fields(item), "masks": records}) + "\n")
        sys.stdout.flush()
        return
    if overlays:  # before the masks: an image counts as done once its masks are written
        path = Path(output) / OVERLAYS / Path(name).with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        overlay(image, [{"mask": r["segmentation"]} for r in records]).save(path)
    writer.add(name, (image.height, image.width), records)
