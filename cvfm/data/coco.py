"""COCO instances files: read one into a source whose items carry instance-mask targets
(`cvfm.data.instances`), and write any such source as one (the images as PNG beside the JSON).

Reading: `file_name`s are relative to the image root (by default the JSON's folder, or its `images/`
sub-folder when there is one); polygons and uncompressed RLEs become compressed RLEs as pycocotools'
`COCO.annToRLE` makes them; crowd regions (`iscrowd: 1`) are not instances and are left out; classes are
the categories in order of id. An image that cannot be used (file missing, size unlike its record, an
annotation that does not decode) is skipped and named in `skipped`, or raises with `strict`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

from pycocotools import mask as mask_utils

from cvfm.data.instances import image_size, report, rle_target
from cvfm.data.items import UNLABELLED, ImageSource, Item
from cvfm.data.text import ENCODING
from cvfm.errors import UsageError

ANNOTATIONS = "annotations.json"
IMAGES = "images"
UNNAMED = "object"  # the category of instances without a class


def open_coco(path: str | Path, image_root: str | Path | None = None, strict: bool = False) -> ImageSource:
    """The images of a COCO instances JSON with their instance masks as each item's `target`."""
    path = Path(path)
    data = _read_json(path)
    root = Path(image_root) if image_root is not None else _default_root(path)
    if not root.is_dir():
        raise UsageError(f"image root '{root}' of '{path}' is not a folder")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(categories)}
    by_image, skipped = defaultdict(list), []
    for ann in data["annotations"]:
        by_image[_key(ann.get("image_id"))].append(ann)
    known = {_key(r.get("id")) for r in data["images"]}
    for key in by_image.keys() - known:
        ids = ", ".join(str(a.get("id")) for a in by_image[key][:3])
        report(skipped, strict, f"{path}: annotation {ids}", f"unknown image_id {key!r}")
    items = []
    for record in data["images"]:
        where = f"{path}: image {record.get('id')!r} ({record.get('file_name')})"
        try:
            file, target = _image(record, by_image[_key(record.get("id"))], root, index)
        except ValueError as e:
            report(skipped, strict, where, str(e))
            continue
        items.append(Item(id=str(record["file_name"]), label=UNLABELLED, ref=str(file), target=target))
    classes = [str(c.get("name", c["id"])) for c in categories] or None
    return ImageSource(name=str(path), items=items, classes=classes, skipped=skipped)


def write_coco(source: ImageSource, folder: str | Path) -> Path:
    """Write `source` (items with instance-mask targets) as a COCO instances set: `folder/annotations.json`
    and `folder/images/000000.png`, ... The folder must not exist; it appears whole or not at all."""
    folder = Path(folder)
    if folder.exists():
        raise UsageError(f"'{folder}' already exists: choose a new folder")
    classes = list(source.classes or [])
    labels = {lab for it in source.items for lab in _target_of(it)["labels"]}
    categories = [{"id": i + 1, "name": c} for i, c in enumerate(classes)]
    if UNLABELLED in labels or not categories:
        categories.append({"id": len(categories) + 1, "name": UNNAMED})
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / IMAGES).mkdir(parents=True)
    try:
        images, annotations = [], []
        for k, item in enumerate(source.items):
            image, target = source.load(k), _target_of(item)
            name = f"{k:06d}.png"
            image.save(tmp / IMAGES / name)
            images.append({"id": k + 1, "file_name": name, "height": image.height, "width": image.width})
            areas = mask_utils.area(target["masks"]) if target["masks"] else []
            for rle, label, box, area in zip(
                target["masks"], target["labels"], target["boxes"], areas, strict=True
            ):
                category = categories[-1]["id"] if label == UNLABELLED else label + 1
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": k + 1,
                        "category_id": category,
                        "segmentation": rle,
                        "area": int(area),
                        "bbox": box,
                        "iscrowd": 0,
                    }
                )
        coco = {"images": images, "annotations": annotations, "categories": categories}
        (tmp / ANNOTATIONS).write_text(json.dumps(coco) + "\n", encoding="utf-8")
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _target_of(item: Item) -> dict:
    if not isinstance(item.target, dict) or "masks" not in item.target:
        raise UsageError(f"item '{item.id}' has no instance masks to write")
    return item.target


def _read_json(path: Path) -> dict:
    """The parsed file, checked for the three lists COCO instances need."""
    try:
        data = json.loads(path.read_text(encoding=ENCODING))
    except json.JSONDecodeError as e:
        raise UsageError(f"'{path}' is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read '{path}': {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise UsageError(f"'{path}' is not a COCO instances file: no \"images\" list")
    for key in ("annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise UsageError(f"'{path}' is not a COCO instances file: no \"{key}\" list")
    if not all(isinstance(c, dict) and "id" in c for c in data["categories"]):
        raise UsageError(f"'{path}': every category needs an \"id\"")
    if not all(isinstance(r, dict) for r in data["images"] + data["annotations"]):
        raise UsageError(f"'{path}': images and annotations must be JSON objects")
    counts = Counter(_key(r.get("id")) for r in data["images"])
    twice = sorted(str(i) for i, n in counts.items() if n > 1)
    if twice:
        raise UsageError(f"'{path}': image ids must be unique ({', '.join(twice[:5])} repeat)")
    return data


def _default_root(path: Path) -> Path:
    sub = path.parent / IMAGES
    return sub if sub.is_dir() else path.parent


def _key(value):
    """An id as a dict key (a list or other unhashable id becomes its text, matching nothing valid)."""
    return value if isinstance(value, (int, str)) else repr(value)


def segmentation_rle(segmentation, h: int, w: int) -> dict:
    """A compressed RLE of a COCO segmentation (polygons, uncompressed or compressed RLE), as
    `COCO.annToRLE` makes it."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        return mask_utils.frPyObjects(segmentation, h, w)
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), (str, bytes)):
        mask_utils.area(segmentation)  # raises on counts that do not decode
        return segmentation
    raise ValueError("expected polygons or an RLE")


def _image(record: dict, anns: list[dict], root: Path, index: dict) -> tuple[Path, dict]:
    """The image file and target of one image record; ValueError naming what is wrong."""
    name, h, w = record.get("file_name"), record.get("height"), record.get("width")
    if not isinstance(name, str) or not isinstance(h, int) or not isinstance(w, int):
        raise ValueError('an image needs a string "file_name" and integer "height" and "width"')
    file = root / name
    if not file.is_file():
        raise ValueError(f"image file '{file}' does not exist")
    try:
        size = image_size(file)
    except OSError as e:
        raise ValueError(f"cannot read image '{file}': {e}") from None
    if size != (h, w):
        raise ValueError(f"image '{file}' is {size[1]}x{size[0]} but its record says {w}x{h}")
    rles, labels = [], []
    for ann in anns:
        if ann.get("iscrowd"):
            continue
        if ann.get("category_id") not in index:
            raise ValueError(f"annotation {ann.get('id')} has unknown category_id {ann.get('category_id')!r}")
        try:
            rle = segmentation_rle(ann.get("segmentation"), h, w)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"annotation {ann.get('id')} has no usable segmentation ({e!r})") from None
        if [int(s) for s in rle["size"]] != [h, w]:
            raise ValueError(f"annotation {ann.get('id')} is a {rle['size'][1]}x{rle['size'][0]} mask")
        rles.append(rle)
        labels.append(index[ann["category_id"]])
    return file, rle_target(rles, labels)
