"""Segmentation data: images with their instance masks, as a source whose items carry the masks as
`target` (`cvfm.data.instances`). `open_masks` reads three kinds:

- `builtin:animal-scenes` (`cvfm.data.scenes`);
- a COCO instances `.json` (`cvfm.data.coco`), its images under the image root;
- a folder of instance-id PNGs (the layout of VOC's SegmentationObject and DAVIS):

      root/images/<name>.<ext>   any image format; sub-folders allowed
      root/masks/<name>.png      one channel, same size: 0 background, 1..N one value per instance
                                 (8- or 16-bit grey, or palette indices); 255 in an 8-bit mask is
                                 VOC's "void" border and belongs to no instance

  Images without a mask, masks without an image and masks unlike their image (size, not one channel)
  are skipped and named in `skipped`, or raise with `strict`. Instances have no class (label -1).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from cvfm.data.coco import open_coco
from cvfm.data.instances import image_size, mask_target, report
from cvfm.data.items import UNLABELLED, ImageSource, Item
from cvfm.data.sources import IMAGE_SUFFIXES, open_source
from cvfm.errors import UsageError

IMAGES, MASKS = "images", "masks"
VOID = 255  # VOC's border label in 8-bit masks
ID_MODES = {"1", "L", "P", "I", "I;16", "I;16B", "I;16L"}
LAYOUT = "images/<name>.<ext> with masks/<name>.png of instance ids"


def open_masks(
    spec: str, *, split: str | None = None, image_root: str | None = None, strict: bool = False
) -> ImageSource:
    """Open segmentation data (see the module docstring): `builtin:animal-scenes`, a COCO `.json` (images
    under `image_root`, by default beside it or in its `images/`), or a folder with `images/` and
    `masks/` (`split` selects a sub-folder holding them). An empty result is a usage error."""
    if image_root is not None and not spec.endswith(".json"):
        raise UsageError("an image root goes with a COCO .json file only")
    if spec.startswith("builtin:"):
        source = open_source(spec, split=split, strict=strict)
        if not all(isinstance(it.target, dict) and "masks" in it.target for it in source.items):
            raise UsageError(f"'{spec}' has no instance masks (segmentation data: builtin:animal-scenes)")
    else:
        path = Path(spec)
        if not path.exists():
            raise UsageError(f"segmentation data '{spec}' does not exist (expected a COCO .json or a folder)")
        if path.is_file() and path.suffix.lower() == ".json":
            if split is not None:
                raise UsageError(f"a COCO file has no splits: leave the split out for '{spec}'")
            source = open_coco(path, image_root, strict)
        elif path.is_dir():
            source = open_mask_folder(path / split if split else path, strict)
        else:
            raise UsageError(f"segmentation data '{spec}' is a file but not a COCO .json")
    if len(source) == 0:
        where = f" (split '{split}')" if split else ""
        raise UsageError(f"segmentation data '{spec}'{where} holds no usable images")
    return source


def open_mask_folder(root: Path, strict: bool = False) -> ImageSource:
    """`root/images/<name>.<ext>` with `root/masks/<name>.png` (instance ids) as a source."""
    if not (root / IMAGES).is_dir() or not (root / MASKS).is_dir():
        raise UsageError(f"folder '{root}' needs '{IMAGES}' and '{MASKS}' sub-folders ({LAYOUT})")
    skipped: list[dict] = []
    images: dict[str, Path] = {}
    for p in _files(root / IMAGES, IMAGE_SUFFIXES):
        key = _key(p, root / IMAGES)
        if key in images:
            report(skipped, strict, str(p), f"another image has the same name: {images[key]}")
        else:
            images[key] = p
    masks = {_key(p, root / MASKS): p for p in _files(root / MASKS, {".png"})}
    for key in sorted(masks.keys() - images.keys()):
        report(skipped, strict, str(masks[key]), f"no image '{IMAGES}/{key}.*' for this mask")
    items = []
    for key, image in sorted(images.items()):
        if key not in masks:
            report(skipped, strict, str(image), f"no mask '{MASKS}/{key}.png' for this image")
            continue
        try:
            target = mask_target(instance_masks(masks[key], image_size(image)))
        except (OSError, ValueError) as e:
            report(skipped, strict, str(masks[key]), str(e))
            continue
        name = image.relative_to(root / IMAGES).as_posix()
        items.append(Item(id=name, label=UNLABELLED, ref=str(image), target=target))
    return ImageSource(name=str(root), items=items, skipped=skipped)


def instance_masks(path: Path, size: tuple[int, int]) -> list[np.ndarray]:
    """The boolean masks of an instance-id PNG whose image is (H, W) `size`, in order of id."""
    with Image.open(path) as img:
        if img.mode not in ID_MODES:
            raise ValueError(f"expected one channel of instance ids, not a {img.mode} image")
        ids, eight_bit = np.asarray(img), img.mode in ("L", "P")
    if ids.shape != size:
        raise ValueError(f"mask is {ids.shape[1]}x{ids.shape[0]} but its image is {size[1]}x{size[0]}")
    values = [v for v in np.unique(ids) if v != 0 and not (eight_bit and v == VOID)]
    return [ids == v for v in values]


def _key(path: Path, folder: Path) -> str:
    """The name an image and its mask share: the path under its folder without the suffix."""
    return path.relative_to(folder).with_suffix("").as_posix()


def _files(folder: Path, suffixes: set[str]) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in suffixes and p.is_file())
