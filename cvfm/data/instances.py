"""The `target` of an image with instance masks, as every segmentation source gives it and every segmentation
method reads it: `{"masks": [COCO RLE], "labels": [class index, or -1], "boxes": [[x, y, w, h]]}`.

Masks are COCO run-length encodings (pycocotools, `counts` a str so the target is plain JSON); boxes are
COCO's XYWH of each mask (`pycocotools.mask.toBbox`: the pixels' extent, so w = last column - first + 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from cvfm.data.items import UNLABELLED, DataError

EXIF_ORIENTATION = 0x0112


def encode_masks(masks: np.ndarray) -> list[dict]:
    """Boolean (N, H, W) masks as COCO RLEs `{"size": [H, W], "counts": str}` (JSON-ready)."""
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(np.asarray(masks).transpose(1, 2, 0), dtype=np.uint8))
    return [{"size": [int(s) for s in r["size"]], "counts": _text(r["counts"])} for r in rles]


def encode_mask(mask: np.ndarray) -> dict:
    """A boolean (H, W) mask as a COCO RLE."""
    return encode_masks(np.asarray(mask)[None])[0]


def decode_mask(rle: dict) -> np.ndarray:
    """A COCO RLE as a boolean (H, W) mask."""
    return mask_utils.decode(rle).astype(bool)


def decode_masks(target: dict) -> np.ndarray:
    """The target's masks as a boolean (N, H, W) array (N may be 0: then (0, 0, 0))."""
    rles = target["masks"]
    if not rles:
        return np.zeros((0, 0, 0), dtype=bool)
    return np.moveaxis(mask_utils.decode(list(rles)), -1, 0).astype(bool)


def mask_target(masks: Sequence[np.ndarray], labels: Sequence[int] | None = None) -> dict:
    """The target of boolean (H, W) masks, with their class indices (UNLABELLED when omitted)."""
    return rle_target([encode_mask(m) for m in masks], labels)


def rle_target(rles: Sequence[dict], labels: Sequence[int] | None = None) -> dict:
    """The target of compressed COCO RLEs (`counts` bytes or str), with their class indices."""
    rles = [{"size": [int(s) for s in r["size"]], "counts": _text(r["counts"])} for r in rles]
    labels = [UNLABELLED] * len(rles) if labels is None else [int(c) for c in labels]
    boxes = mask_utils.toBbox(rles).tolist() if rles else []
    return {"masks": rles, "labels": labels, "boxes": [[float(v) for v in b] for b in boxes]}


def _text(counts: bytes | str) -> str:
    return counts.decode("ascii") if isinstance(counts, bytes) else counts


def target_size(target: dict) -> tuple[int, int] | None:
    """The (H, W) of the target's masks; None when it has none."""
    if not target["masks"]:
        return None
    return tuple(int(s) for s in target["masks"][0]["size"])


def image_size(path: str | Path) -> tuple[int, int]:
    """The (H, W) of an image file as `decode_image` will see it (EXIF-rotated), from its header only."""
    with Image.open(path) as img:
        w, h = img.size
        if img.getexif().get(EXIF_ORIENTATION) in (5, 6, 7, 8):  # turned by a quarter
            w, h = h, w
    return h, w


def report(skipped: list[dict], strict: bool, where: str, reason: str) -> None:
    """Keep a problem found while listing a source in `skipped`, or raise it with `strict`."""
    if strict:
        raise DataError(f"{where}: {reason}")
    skipped.append({"where": where, "reason": reason})
