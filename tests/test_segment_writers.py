"""The output formats of `cvfm segment auto`: amg.py's folders, COCO RLE lists, one COCO instances file
(read back by pycocotools), YOLO-seg polygons (re-rasterised by cv2)."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cvfm.data.instances import encode_masks
from cvfm.errors import CvfmError, UsageError
from cvfm.models.amg.masks import mask_boxes, rle_area, xyxy_to_xywh
from cvfm.segment.writers import COCO_FILE, open_writer, yolo_lines

H, W = 101, 161
# scripts/amg.py's header, copied from its write_masks_to_folder
AMG_HEADER = (
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,stability_score,"
    "crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)


def _masks() -> np.ndarray:
    """A 35 x 15 rectangle, a disk of radius 20 with a small separate square, an ellipse (101 x 161)."""
    y, x = np.mgrid[:H, :W]
    rect = (y >= 30) & (y < 45) & (x >= 15) & (x < 50)
    disk = ((x - 100) ** 2 + (y - 50) ** 2 <= 20**2) | ((y >= 90) & (y < 95) & (x >= 5) & (x < 10))
    ellipse = ((x - 60) / 40.0) ** 2 + ((y - 70) / 18.0) ** 2 <= 1
    return np.stack([rect, disk, ellipse])


def _records(masks: np.ndarray) -> list[dict]:
    rles = encode_masks(masks)
    boxes = mask_boxes(torch.from_numpy(masks)).tolist()
    return [
        {
            "segmentation": rle,
            "area": rle_area(rle),
            "bbox": xyxy_to_xywh(box),
            "predicted_iou": 0.9 - i / 10,
            "point_coords": [[20.125 + i, 37.875]],
            "stability_score": 0.96875,
            "crop_box": [0, 0, W, H],
        }
        for i, (rle, box) in enumerate(zip(rles, boxes, strict=True))
    ]


def test_amg_folder_is_amg_pys(tmp_path):
    masks = _masks()
    writer = open_writer("amg", tmp_path)
    writer.add("sub/photo.jpg", (H, W), _records(masks))
    writer.close()
    folder = tmp_path / "sub" / "photo"
    assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "2.png", "metadata.csv"]
    for i, mask in enumerate(masks):
        png = Image.open(folder / f"{i}.png")
        assert png.mode == "L" and png.size == (W, H)
        assert np.array_equal(np.asarray(png), mask.astype(np.uint8) * 255)
    text = (folder / "metadata.csv").read_text()
    lines = text.split("\n")
    assert (
        lines[0] == AMG_HEADER and len(lines) == 4 and not text.endswith("\n")
    )  # as amg.py: no last newline
    assert lines[1] == "0,525,15,30,34,14,20.125,37.875,0.9,0.96875,0,0,161,101"
    rows = list(csv.DictReader(text.splitlines()))
    assert [len(r) for r in rows] == [14] * 3 and [int(r["area"]) for r in rows] == masks.sum((1, 2)).tolist()
    assert [r["point_input_x"] for r in rows] == ["20.125", "21.125", "22.125"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["photo"]  # no temporary folder left


def test_outputs_are_never_overwritten(tmp_path):
    records = _records(_masks()[:1])
    for fmt in ("amg", "coco-rle", "yolo"):
        writer = open_writer(fmt, tmp_path / fmt)
        writer.add("a.png", (H, W), records)
        before = sorted(str(p) for p in (tmp_path / fmt).rglob("*"))
        with pytest.raises(CvfmError, match="exists"):
            writer.add("a.jpg", (H, W), [])  # another image with the same stem
        assert sorted(str(p) for p in (tmp_path / fmt).rglob("*")) == before
    coco = open_writer("coco", tmp_path)
    coco.add("a.png", (H, W), records)
    with pytest.raises(CvfmError, match="given twice"):
        coco.add("a.png", (H, W), records)
    coco.close()
    with pytest.raises(CvfmError, match="exists"):
        open_writer("coco", tmp_path)
    with pytest.raises(UsageError, match="relative path"):
        open_writer("yolo", tmp_path).add("/elsewhere/a.png", (H, W), records)
    with pytest.raises(UsageError, match="unknown output format 'png'"):
        open_writer("png", tmp_path)


def test_coco_rle_lists_the_records(tmp_path):
    records = _records(_masks())
    writer = open_writer("coco-rle", tmp_path)
    writer.add("photo.png", (H, W), records)
    writer.add("empty.png", (H, W), [])
    writer.close()
    assert json.loads((tmp_path / "photo.json").read_text()) == records
    assert json.loads((tmp_path / "empty.json").read_text()) == []


def test_coco_file_loads_in_pycocotools_and_its_masks_are_the_masks(tmp_path, capsys):
    masks = _masks()
    writer = open_writer("coco", tmp_path)
    writer.add("a/one.jpg", (H, W), _records(masks))
    writer.add("two.png", (H, W), [])
    writer.add("three.png", (H, W), _records(masks[1:]))
    assert not (tmp_path / COCO_FILE).exists()  # written whole, at the end
    writer.close()
    coco = COCO(str(tmp_path / COCO_FILE))
    assert [coco.imgs[i]["file_name"] for i in (1, 2, 3)] == ["a/one.jpg", "two.png", "three.png"]
    assert all(coco.imgs[i]["height"] == H and coco.imgs[i]["width"] == W for i in (1, 2, 3))
    assert coco.getAnnIds(imgIds=[2]) == [] and coco.getCatIds() == [1]
    expected = {1: list(masks), 3: list(masks[1:])}
    for image_id, image_masks in expected.items():
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        assert len(anns) == len(image_masks)
        for ann, mask in zip(anns, image_masks, strict=True):
            assert np.array_equal(coco.annToMask(ann), mask.astype(np.uint8))
            assert ann["area"] == mask.sum() and ann["iscrowd"] == 0 and ann["category_id"] == 1
            assert ann["bbox"] == mask_utils.toBbox(ann["segmentation"]).tolist()
            assert isinstance(ann["score"], float)
    assert sorted(coco.anns) == [1, 2, 3, 4, 5]
    # the file is also a valid result file for itself: every mask matched, AP 1
    results = coco.loadRes(json.loads((tmp_path / COCO_FILE).read_text())["annotations"])
    evaluation = COCOeval(coco, results, "segm")
    evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    assert evaluation.stats[0] == pytest.approx(1.0)
    capsys.readouterr()


def _polygon_mask(line: str) -> np.ndarray:
    values = line.split()
    assert values[0] == "0" and len(values) % 2 == 1 and len(values) >= 7
    xy = np.array(values[1:], dtype=float).reshape(-1, 2)
    assert ((xy >= 0) & (xy <= 1)).all()
    out = np.zeros((H, W), dtype=np.uint8)
    cv2.fillPoly(out, [np.rint(xy * [W, H]).astype(np.int32)], 1)
    return out.astype(bool)


def test_yolo_polygons_cover_the_masks(tmp_path):
    masks = _masks()
    writer = open_writer("yolo", tmp_path)
    writer.add("photo.png", (H, W), _records(masks))
    writer.add("empty.png", (H, W), [])
    writer.close()
    lines = (tmp_path / "photo.txt").read_text().splitlines()
    assert len(lines) == 3 and (tmp_path / "empty.txt").read_text() == ""
    for line, mask in zip(lines, masks, strict=True):
        drawn = _polygon_mask(line)
        largest = mask.copy()
        largest[88:, :20] = False  # the disk's mask: its largest part is the disk
        assert (drawn & largest).sum() / (drawn | largest).sum() > 0.9
        assert (drawn & ~mask).sum() <= 0.02 * mask.sum()  # the polygon stays on the mask
    assert np.array_equal(_polygon_mask(lines[0]), masks[0])  # a rectangle's corners draw it exactly
    dot = np.zeros((1, H, W), dtype=bool)
    dot[0, 5, 5] = True
    assert yolo_lines(_records(dot), (H, W)) == []  # a polygon needs 3 points
