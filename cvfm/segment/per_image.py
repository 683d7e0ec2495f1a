"""The loop `segment prompt` and `segment text` share: records of masks for each image of a source, written as
JSON lines on stdout (`-`) or into one folder per image.

A record is a JSON object with `id`, `image` and `masks` (each with `segmentation`, a COCO RLE) plus what
the command adds. An image's folder, named by its id, holds `prompt<k>_mask<j>.png` (mask j of record k,
0/255), `masks.jsonl` (the records) and `overlay.png`; it is filled under a temporary name then renamed,
so a finished image's folder is complete and a rerun skips it. Unreadable images are skipped, counted and
named (`--strict`: stop).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from cvfm.data.decode import DecodeError
from cvfm.data.instances import decode_mask
from cvfm.data.items import ImageSource, Item
from cvfm.data.loader import SkipLog, Skipped
from cvfm.errors import UsageError
from cvfm.runtime.progress import log, progress

COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]

# One job: an image of a source (its index) and what the command does with it.
Job = tuple[ImageSource, int, Any]
# The records of one job's image; `Draw` turns them into what overlay() shows.
Predict = Callable[[Job, Image.Image], list[dict]]
Draw = Callable[[list[dict]], list[dict]]


def segment_images(
    task: str, jobs: list[Job], folder: Path | None, predict: Predict, draw: Draw, strict: bool
) -> dict:
    """Run `predict` on the image of every job and write its records (see the module docstring); returns
    the counts: images done, already_done (finished folders skipped), masks, skipped (unreadable)."""
    done = already = masks = 0
    skips = SkipLog(strict)
    with progress(task, total=len(jobs)) as advance:
        for job in jobs:
            source, i, _ = job
            item = source.items[i]
            target = None if folder is None else folder / folder_name(item.id)
            if target is not None and target.is_dir():
                already += 1
                continue
            try:
                image = source.load(i)
            except DecodeError as e:  # missing, corrupt or too large: named and counted
                skips.add([Skipped(i, str(item.ref) if isinstance(item.ref, str) else item.id, str(e))])
                continue
            records = predict(job, image)
            masks += sum(len(r["masks"]) for r in records)
            if target is None:
                sys.stdout.write("".join(json.dumps(r) + "\n" for r in records))
                sys.stdout.flush()
            else:
                write_image_folder(target, records, overlay(image, draw(records)))
            done += 1
            advance(1)
    problems = skips.as_list()
    if problems:
        log(f"{task}: skipped {len(problems)} unreadable image(s), first: {problems[0]['where']}")
    return {"images": done, "already_done": already, "masks": masks, "skipped": problems}


def image_fields(item: Item) -> dict:
    """A record's `id` and `image` (the image's path, or its id when it has none)."""
    return {"id": item.id, "image": item.ref if isinstance(item.ref, str) else item.id}


def output_folder(output: str, overwrite: bool) -> Path | None:
    """The folder `output` names (made if missing; emptied first with `overwrite`), or None for `-`."""
    if output == "-":
        return None
    folder = Path(output)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output '{output}' is a file: masks go to a folder (or - for JSON lines on stdout)")
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def folder_name(item_id: str) -> str:
    """A file-system-safe folder name for an image id (its hash keeps distinct ids apart)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id).strip("._")[-80:] or "image"
    return f"{stem}-{hashlib.sha256(item_id.encode()).hexdigest()[:8]}"


def write_image_folder(target: Path, records: list[dict], shown: Image.Image) -> None:
    """`target` with each record's masks as PNGs, masks.jsonl and `shown` as overlay.png (all or nothing)."""
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for k, record in enumerate(records):
        for j, mask in enumerate(record["masks"]):
            png = decode_mask(mask["segmentation"]).astype(np.uint8) * 255
            Image.fromarray(png).save(tmp / f"prompt{k}_mask{j}.png")
    (tmp / "masks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    shown.save(tmp / "overlay.png")
    tmp.rename(target)


def overlay(image: Image.Image, layers: list[dict]) -> Image.Image:
    """The image with each layer drawn in its own colour: `mask` (a COCO RLE, tinted at half opacity),
    `points` with `labels` (green: foreground, red: background) and `box` (x0, y0, x1, y1), each optional."""
    canvas = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for k, layer in enumerate(layers):
        if layer.get("mask") is not None:
            mask = decode_mask(layer["mask"])
            canvas[mask] = 0.5 * canvas[mask] + 0.5 * np.array(COLOURS[k % len(COLOURS)], dtype=np.float32)
    out = Image.fromarray(canvas.round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    r = max(2, round(min(out.size) / 100))
    for k, layer in enumerate(layers):
        for (x, y), label in zip(layer.get("points", []), layer.get("labels", []), strict=True):
            colour = (0, 200, 0) if label else (220, 0, 0)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour, outline="white")
        if layer.get("box") is not None:
            draw.rectangle(layer["box"], outline=COLOURS[k % len(COLOURS)], width=max(1, r // 2))
    return out
