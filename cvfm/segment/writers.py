"""The output formats of `cvfm segment auto`, each a writer with `add(name, size, records)` per image and
`close()` at the end of the run. `name` is the image's path relative to the input (its output keeps the
folders, drops the extension); `size` its (H, W); `records` those of `generate_masks`.

- amg: segment-anything's scripts/amg.py layout, byte for byte: a folder per image with 0.png, 1.png,
  ... (uint8, 0 or 255) and metadata.csv (amg.py's 14 columns and header).
- coco-rle: `amg.py --convert-to-rle`: per image a .json list of the records.
- coco: one COCO instances file for the run, instances.json (written at `close()`): images, annotations
  (category 1 "object", RLE segmentation, area, bbox as pycocotools' `toBbox`, iscrowd 0, score = the
  predicted IoU) and categories.
- yolo: YOLO-seg labels, per image a .txt with one line "0 x1 y1 x2 y2 ..." per mask: the mask's largest
  external contour (cv2.findContours) in [0, 1] image coordinates. A YOLO line is one instance and a
  polygon without holes, so other parts and holes of a mask are dropped, as are masks whose contour has
  fewer than 3 points.

Every file (and each amg folder) appears whole, written atomically; an output that exists is refused.
`done(name)` says whether an earlier, interrupted run finished image `name`, so a rerun goes on where it
stopped (coco keeps the finished images in instances.partial.jsonl until `close()`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from cvfm.data.instances import decode_mask
from cvfm.errors import CvfmError, UsageError
from cvfm.runtime.files import fsync_path, write_text

AMG_COLUMNS = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,stability_score,"
    "crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)
COCO_FILE = "instances.json"
PARTIAL_FILE = "instances.partial.jsonl"
CATEGORY = {"id": 1, "name": "object", "supercategory": "object"}


class MaskWriter(Protocol):
    def done(self, name: str) -> bool: ...

    def add(self, name: str, size: tuple[int, int], records: list[dict]) -> None: ...

    def close(self) -> None: ...


def open_writer(fmt: str, root: str | Path) -> MaskWriter:
    """The writer of format `fmt` (one of FORMATS) into the folder `root`."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown output format '{fmt}': choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt](Path(root))


def output_path(root: Path, name: str, suffix: str) -> Path:
    """Where image `name`'s output goes: `root/<name without extension><suffix>`, refused if it exists."""
    rel = Path(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.name:
        raise UsageError(f"image name '{name}' must be a relative path inside the input")
    path = root / rel.with_suffix(suffix)
    if path.exists():
        raise CvfmError(f"'{path}' exists (written before, or two images named alike): not overwriting it")
    return path


def metadata_csv(records: list[dict]) -> str:
    """amg.py's metadata.csv: the header, then one row per mask (no newline at the end, as amg.py)."""
    rows = [AMG_COLUMNS]
    for i, r in enumerate(records):
        values = [i, r["area"], *r["bbox"], *r["point_coords"][0], r["predicted_iou"], r["stability_score"]]
        rows.append(",".join(str(v) for v in [*values, *r["crop_box"]]))
    return "\n".join(rows)


class AmgWriter:
    """<root>/<name>/0.png, 1.png, ..., metadata.csv; the folder is filled aside, then renamed in place."""

    def __init__(self, root: Path):
        self.root = root

    def done(self, name: str) -> bool:
        return (self.root / Path(name).with_suffix("")).is_dir()

    def add(self, name: str, size: tuple[int, int], records: list[dict]) -> None:
        folder = output_path(self.root, name, "")
        folder.parent.mkdir(parents=True, exist_ok=True)
        for stale in folder.parent.glob(f".{folder.name}.*.tmp"):  # left by a run killed while writing it
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
        try:
            for i, r in enumerate(records):
                mask = decode_mask(r["segmentation"]).astype(np.uint8) * 255
                Image.fromarray(mask).save(tmp / f"{i}.png")
            (tmp / "metadata.csv").write_text(metadata_csv(records), encoding="utf-8")
            for f in tmp.iterdir():
                fsync_path(f)
            os.rename(tmp, folder)
            fsync_path(folder.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def close(self) -> None:
        pass


class CocoRleWriter:
    """<root>/<name>.json: the image's records as a JSON list (as `amg.py --convert-to-rle`)."""

    def __init__(self, root: Path):
        self.root = root

    def done(self, name: str) -> bool:
        return (self.root / Path(name).with_suffix(".json")).is_file()

    def add(self, name: str, size: tuple[int, int], records: list[dict]) -> None:
        write_text(output_path(self.root, name, ".json"), json.dumps(records))

    def close(self) -> None:
        pass


class CocoWriter:
    """<root>/instances.json: one COCO instances dict for all images, written at `close()`."""

    def __init__(self, root: Path):
        self.path = root / COCO_FILE
        if self.path.exists():
            raise CvfmError(f"'{self.path}' exists: not overwriting it")
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.names: set[str] = set()
        self.partial = root / PARTIAL_FILE  # the images finished so far, one JSON line each
        for line in _whole_lines(self.partial):
            self._add(line["name"], tuple(line["size"]), line["records"])

    def done(self, name: str) -> bool:
        return name in self.names

    def add(self, name: str, size: tuple[int, int], records: list[dict]) -> None:
        self._add(name, size, records)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        with open(self.partial, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "size": list(size), "records": records}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _add(self, name: str, size: tuple[int, int], records: list[dict]) -> None:
        if name in self.names:
            raise CvfmError(f"image '{name}' given twice")
        self.names.add(name)
        image_id = len(self.images) + 1
        self.images.append({"id": image_id, "file_name": name, "height": size[0], "width": size[1]})
        for r in records:
            rle = r["segmentation"]
            self.annotations.append(
                {
                    "id": len(self.annotations) + 1,
                    "image_id": image_id,
                    "category_id": CATEGORY["id"],
                    "segmentation": rle,
                    "area": r["area"],
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                    "score": r["predicted_iou"],
                }
            )

    def dataset(self) -> dict:
        return {"images": self.images, "annotations": self.annotations, "categories": [CATEGORY]}

    def close(self) -> None:
        write_text(self.path, json.dumps(self.dataset()))
        self.partial.unlink(missing_ok=True)


def _whole_lines(path: Path) -> list[dict]:
    """The complete JSON lines of a file appended to line by line (a line cut by a kill is dropped)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    lines, keep = [], 0
    for raw in data.splitlines(keepends=True):
        try:
            if not raw.endswith(b"\n"):
                raise ValueError("cut")
            lines.append(json.loads(raw))
        except ValueError:
            break
        keep += len(raw)
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
    return lines


def yolo_polygon(mask: np.ndarray) -> np.ndarray | None:
    """The (K, 2) x, y pixel corners of the mask's largest external contour; None under 3 points."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    largest = max(contours, key=cv2.contourArea).reshape(-1, 2)
    return largest if len(largest) >= 3 else None


def yolo_lines(records: list[dict], size: tuple[int, int]) -> list[str]:
    """One YOLO-seg line per mask with a polygon, class 0, coordinates divided by the width / height."""
    h, w = size
    lines = []
    for r in records:
        polygon = yolo_polygon(decode_mask(r["segmentation"]))
        if polygon is not None:
            xy = polygon / np.array([w, h])
            lines.append(" ".join(["0", *(f"{v:.6f}" for v in xy.ravel())]))
    return lines


class YoloWriter:
    """<root>/<name>.txt: YOLO-seg polygon lines (an empty file for an image without masks)."""

    def __init__(self, root: Path):
        self.root = root

    def done(self, name: str) -> bool:
        return (self.root / Path(name).with_suffix(".txt")).is_file()

    def add(self, name: str, size: tuple[int, int], records: list[dict]) -> None:
        lines = yolo_lines(records, size)
        write_text(output_path(self.root, name, ".txt"), "".join(f"{line}\n" for line in lines))

    def close(self) -> None:
        pass


FORMATS: dict[str, type] = {
    "amg": AmgWriter,
    "coco-rle": CocoRleWriter,
    "coco": CocoWriter,
    "yolo": YoloWriter,
}
