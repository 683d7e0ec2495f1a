"""Binary masks as segment-anything's automatic mask generator handles them: COCO RLE (pycocotools), boxes,
the stability score, box NMS, and the removal of small islands and holes (`min_mask_region_area`).

Boxes are x0, y0, x1, y1 with x1, y1 the last pixel of the mask (inclusive), as `batched_mask_to_box` in
segment-anything's utils/amg.py; the XYWH boxes of its records are therefore (x0, y0, x1 - x0, y1 - y0),
one less in width and height than pycocotools' `toBbox`.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import batched_nms, masks_to_boxes

from cvfm.data.instances import decode_mask, encode_masks


def rle_area(rle: dict) -> int:
    """The number of pixels in the mask."""
    return int(mask_utils.area(rle))


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) masks as (N, 4) int64 boxes x0, y0, x1, y1 (inclusive); an empty mask gives zeros."""
    if len(masks) == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=masks.device)
    return masks_to_boxes(masks).long()


def extent_boxes(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """`mask_boxes` from each mask's occupied rows (N, H) and columns (N, W) (`masks.any(2)`, `any(1)`), for
    callers that compute those faster than `masks_to_boxes` does."""
    if len(rows) == 0:
        return torch.zeros(0, 4, dtype=torch.long, device=rows.device)
    (_, h), (_, w) = rows.shape, columns.shape
    rows, columns = rows.to(torch.uint8), columns.to(torch.uint8)
    y0, x0 = rows.argmax(1), columns.argmax(1)
    y1, x1 = (h - 1) - rows.flip(1).argmax(1), (w - 1) - columns.flip(1).argmax(1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    return boxes.masked_fill_(~rows.bool().any(1)[:, None], 0)


def xyxy_to_xywh(box: list) -> list:
    """x0, y0, x1, y1 as x0, y0, x1 - x0, y1 - y0."""
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


def stability_score(logits: torch.Tensor, mask_threshold: float, offset: float) -> torch.Tensor:
    """(..., H, W) logits: the IoU of the masks at `mask_threshold + offset` and at `mask_threshold - offset`
    (the first lies inside the second, so IoU = area ratio). An empty looser mask gives NaN (0 / 0), as
    segment-anything's `calculate_stability_score`."""
    # Counted as the reference counts: int16 along rows, then int32 (a third of the time of int64 sums).
    inner = (logits > mask_threshold + offset).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    outer = (logits > mask_threshold - offset).sum(-1, dtype=torch.int16).sum(-1, dtype=torch.int32)
    return inner / outer


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Indices of the boxes kept by non-maximum suppression, highest score first (torchvision's
    `batched_nms` with one category, as segment-anything calls it)."""
    categories = torch.zeros(len(boxes), dtype=torch.long, device=boxes.device)
    return batched_nms(boxes.float(), scores.to(boxes.device), categories, iou_threshold)


def remove_small_regions(
    mask: np.ndarray, min_area: int, mode: Literal["holes", "islands"]
) -> tuple[np.ndarray, bool]:
    """Fill holes (connected regions of the background, 8-connected, border ones included) or drop
    islands (regions of the mask) of fewer than `min_area` pixels; when every island is small, the largest
    is kept. Returns the mask and whether it changed."""
    holes = mode == "holes"
    regions = (mask != holes).astype(np.uint8)  # the background for holes, the mask for islands
    count, labels, stats, _ = cv2.connectedComponentsWithStats(regions, connectivity=8)
    areas = stats[1:count, cv2.CC_STAT_AREA]  # label 0 is everything outside the regions
    small = areas < min_area
    if not small.any():
        return mask, False
    if holes:
        return mask | np.isin(labels, np.flatnonzero(small) + 1), True
    big = np.flatnonzero(~small) + 1
    return np.isin(labels, big if len(big) else [areas.argmax() + 1]), True


def clean_small_regions(
    rles: list[dict], min_area: int, nms_threshold: float
) -> tuple[torch.Tensor, list[dict], torch.Tensor]:
    """segment-anything's `postprocess_small_regions`: fill the small holes then drop the small islands of
    every mask, and rerun box NMS on the cleaned masks' boxes scoring unchanged masks 1, changed ones 0.

    Returns the kept indices (in NMS order), the RLEs (re-encoded where cleaning changed the mask) and
    the (N, 4) boxes of the cleaned masks."""
    out, boxes, unchanged = [], [], []
    for rle in rles:
        mask, filled = remove_small_regions(decode_mask(rle), min_area, "holes")
        mask, cut = remove_small_regions(mask, min_area, "islands")
        same = not (filled or cut)
        out.append(rle if same else encode_masks(mask[None])[0])
        boxes.append(mask_boxes(torch.from_numpy(mask)[None]))
        unchanged.append(float(same))
    if not rles:
        return torch.zeros(0, dtype=torch.long), [], torch.zeros(0, 4, dtype=torch.long)
    boxes = torch.cat(boxes)
    return nms(boxes, torch.tensor(unchanged), nms_threshold), out, boxes


def mask_record(logits: torch.Tensor, mask: np.ndarray, predicted_iou: float) -> dict:
    """The record of one predicted mask from its (H, W) logits and binary mask: segmentation (COCO RLE),
    area, bbox (XYWH as amg.py), predicted_iou, stability_score (threshold 0, offset 1; None for a mask
    whose looser version is empty too, where the reference's 0 / 0 gives NaN, not JSON)."""
    box = mask_boxes(torch.from_numpy(mask)[None])[0].tolist()
    stability = float(stability_score(logits.float(), 0.0, 1.0))
    return {
        "segmentation": encode_masks(mask[None])[0],
        "area": int(mask.sum()),
        "bbox": xyxy_to_xywh(box),
        "predicted_iou": predicted_iou,
        "stability_score": None if stability != stability else stability,
    }
