"""Pseudo-labels for `cvfm segment train --pseudo`: the masks `cvfm segment auto` wrote for unlabelled images,
read back as training targets, so that a model can be trained, label more images automatically, and be
trained again on both (the semi- and fully automatic stages of SAM's data engine).

The auto output is one of its formats (`cvfm.segment.writers`):
- amg: a folder per image, `<name>/metadata.csv` with `0.png`, `1.png`, ...;
- coco-rle: a `<name>.json` per image, its records as a JSON list;
- coco: `instances.json` (or any COCO instances `.json` given as the path itself), images by `file_name`,
  "score" the predicted IoU (no stability score).

`<name>` is the image's name in the data auto read (`output_name`: its id, for a folder the path under
it), without the extension for amg and coco-rle. The images are found by opening that same data again (the
`images` spec and `split`, as given to auto) and matching the names. A mask is kept when its predicted IoU
reaches `min_iou` and its stability score `min_stability` (0 keeps every mask auto wrote; auto has already
dropped those under its own --pred-iou-thresh and --stability-score-thresh); an image left without masks
is not used.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from cvfm.data.coco import segmentation_rle
from cvfm.data.decode import DecodeError
from cvfm.data.instances import encode_mask, image_size, report, rle_target
from cvfm.data.items import UNLABELLED, ImageSource, Item
from cvfm.data.sources import open_source
from cvfm.data.text import ENCODING
from cvfm.errors import UsageError
from cvfm.segment.auto_run import output_name
from cvfm.segment.writers import AMG_COLUMNS, COCO_FILE, PARTIAL_FILE

Keep = Callable[[float | None, float | None], bool]  # (predicted IoU, stability score) -> keep the mask?


def open_pseudo(
    path: str,
    images: str,
    *,
    split: str | None = None,
    min_iou: float = 0.0,
    min_stability: float = 0.0,
    strict: bool = False,
) -> tuple[ImageSource, dict]:
    """The images of `images` (`split`) that the auto output `path` has kept masks for, each with those
    masks as its target (ids "pseudo:<id>"), and a record of what was read and kept for run.json."""
    root = Path(path)
    fmt = auto_format(root)
    if fmt == "coco" and min_stability > 0:
        raise UsageError(
            f"'{path}' is a COCO file, which holds no stability scores: leave --pseudo-min-stability "
            "out, or label the images with cvfm segment auto --format amg or coco-rle"
        )
    keep = _keep(min_iou, min_stability, path)
    found = READERS[fmt](root, keep)
    source = open_source(images, split=split, strict=strict)
    index = _names(source, with_suffix=fmt == "coco")
    unknown = sorted(set(found) - set(index))
    if unknown:
        raise UsageError(
            f"{len(unknown)} image(s) of the auto output '{path}' are not in '{images}'"
            f"{f' (split {split})' if split else ''}, first: '{unknown[0]}'; give --pseudo-images (and "
            "--pseudo-split) the data that cvfm segment auto labelled"
        )
    items, skipped, read, kept = [], list(source.skipped), 0, 0
    for name in sorted(found):
        i, (records, total) = index[name], found[name]
        read += total
        if not records:
            continue
        try:
            size = _image_size(source, i)
        except (OSError, DecodeError) as e:
            report(skipped, strict, str(source.items[i].ref), f"cannot read the image: {e}")
            continue
        for r in records:
            if tuple(r["size"]) != size:
                raise UsageError(
                    f"a mask of '{name}' in '{path}' is {r['size'][1]}x{r['size'][0]} but the image in "
                    f"'{images}' is {size[1]}x{size[0]}: not the images auto labelled"
                )
        item = source.items[i]
        items.append(Item(id=f"pseudo:{item.id}", label=UNLABELLED, ref=item.ref, target=rle_target(records)))
        kept += len(records)
    pseudo = copy.copy(source)
    pseudo.name, pseudo.items, pseudo.classes, pseudo.skipped = f"pseudo:{path}", items, None, skipped
    record = {
        "path": path,
        "format": fmt,
        "images_data": images,
        "split": split,
        "min_iou": min_iou,
        "min_stability": min_stability,
        "images_labelled": len(found),
        "images": len(items),
        "masks_read": read,
        "masks": kept,
    }
    return pseudo, record


def auto_format(root: Path) -> str:
    """Which format of `cvfm segment auto` `root` holds (see the module docstring)."""
    if root.is_file() and root.suffix.lower() == ".json":
        return "coco"
    if not root.is_dir():
        raise UsageError(f"--pseudo '{root}' is neither a cvfm segment auto output folder nor a COCO .json")
    if (root / COCO_FILE).is_file():
        return "coco"
    if (root / PARTIAL_FILE).is_file():
        raise UsageError(
            f"'{root}' holds an unfinished cvfm segment auto run ({PARTIAL_FILE}, no {COCO_FILE}): "
            "run the same command again to finish it"
        )
    if _visible(root, "metadata.csv"):
        return "amg"
    if _visible(root, "*.json"):
        return "coco-rle"
    raise UsageError(
        f"'{root}' holds no cvfm segment auto output (amg folders with metadata.csv, coco-rle .json files "
        f"or {COCO_FILE})"
    )


def _visible(root: Path, pattern: str) -> list[Path]:
    """The files matching `pattern` under `root`, but not in hidden folders (a killed run's leftovers)."""
    files = (p for p in sorted(root.rglob(pattern)) if p.is_file())
    return [p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)]


def _keep(min_iou: float, min_stability: float, path: str) -> Keep:
    def keep(iou: float | None, stability: float | None) -> bool:
        for value, least, what in ((iou, min_iou, "predicted IoU"), (stability, min_stability, "stability")):
            if least <= 0:
                continue
            if value is None:
                raise UsageError(f"masks in '{path}' have no {what} to filter by: leave its threshold out")
            if math.isnan(value) or value < least:
                return False
        return True

    return keep


Found = dict[str, tuple[list[dict], int]]  # image name -> (kept masks as {"size", "counts"}, masks read)


def _read_amg(root: Path, keep: Keep) -> Found:
    out: Found = {}
    for csv in _visible(root, "metadata.csv"):
        lines = csv.read_text(encoding=ENCODING).splitlines()
        if not lines or lines[0].strip() != AMG_COLUMNS:
            raise UsageError(f"'{csv}' is not an amg metadata.csv (its header is not amg.py's)")
        rles = []
        for lineno, line in enumerate(lines[1:], start=2):
            values = line.split(",")
            try:
                iou, stability = float(values[8]), float(values[9])
            except (IndexError, ValueError):
                raise UsageError(f"{csv}:{lineno}: not a row of amg.py's 14 columns") from None
            if keep(iou, stability):
                rles.append(encode_mask(_read_mask(csv.parent / f"{values[0]}.png")))
        out[csv.parent.relative_to(root).as_posix()] = (rles, len(lines) - 1)
    return out


def _read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L")) > 127
    except OSError as e:
        raise UsageError(f"cannot read the mask '{path}': {e}") from None


def _read_coco_rle(root: Path, keep: Keep) -> Found:
    out: Found = {}
    for file in _visible(root, "*.json"):
        records = _json(file)
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise UsageError(f"'{file}' is not a coco-rle output (a JSON list of mask records)")
        try:
            rles = [r["segmentation"] for r in records if keep(r["predicted_iou"], r["stability_score"])]
        except KeyError as e:
            raise UsageError(f"a record of '{file}' has no {e}") from None
        out[file.relative_to(root).with_suffix("").as_posix()] = (rles, len(records))
    return out


def _read_coco(root: Path, keep: Keep) -> Found:
    file = root / COCO_FILE if root.is_dir() else root
    data = _json(file)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UsageError(f"'{file}' is not a COCO instances file (no \"images\" list)")
    images = {r.get("id"): r for r in data["images"] if isinstance(r, dict)}
    out: Found = {str(r.get("file_name")): ([], 0) for r in images.values()}
    for ann in data.get("annotations", []):
        image = images.get(ann.get("image_id"))
        if image is None:
            raise UsageError(f"'{file}': annotation {ann.get('id')} has an unknown image_id")
        name = str(image.get("file_name"))
        rles, total = out[name]
        if not ann.get("iscrowd") and keep(ann.get("score"), None):
            try:
                rles.append(segmentation_rle(ann.get("segmentation"), image["height"], image["width"]))
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise UsageError(f"'{file}': annotation {ann.get('id')} has no usable mask ({e!r})") from None
        out[name] = (rles, total + 1)
    return out


def _json(file: Path):
    try:
        return json.loads(file.read_text(encoding=ENCODING))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read '{file}': {e}") from None


READERS: dict[str, Callable[[Path, Keep], Found]] = {
    "amg": _read_amg,
    "coco-rle": _read_coco_rle,
    "coco": _read_coco,
}


def _names(source: ImageSource, *, with_suffix: bool) -> dict[str, int]:
    """Each item's output name (as auto named it), without its extension unless `with_suffix`."""
    names: dict[str, int] = {}
    for i, item in enumerate(source.items):
        name = output_name(item)
        names.setdefault(name if with_suffix else Path(name).with_suffix("").as_posix(), i)
    return names


def _image_size(source: ImageSource, i: int) -> tuple[int, int]:
    """(H, W) of item i as decoded: from a file's header, else by loading it."""
    ref = source.items[i].ref
    if isinstance(ref, str):
        return image_size(ref)
    image = source.load(i)
    return image.height, image.width
