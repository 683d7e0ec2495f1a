"""Segmentation metrics, pure functions of masks: the interactive protocol of RITM, SimpleClick and SAM
(simulated clicks, mIoU@k, NoC@85/90), box prompts, and the mask AR of automatic masks (COCO's).

Clicks follow the usual simulated user: the first click at the point of the object farthest from its
boundary; each next one inside the largest error region (8-connected; missed object -> a positive click,
spilled background -> a negative one; a tie goes to the positive), at its point farthest from that
region's boundary. Distances are exact Euclidean (`cv2.distanceTransform`) on the region padded with
background, so the image border counts as boundary; among equally far points the first in row-major
order wins. Points are (x, y) = (column, row) pixel indices, the frame of the segmenter face.
(RITM's clicker picks between all false negatives and all false positives by the larger distance to
the boundary, not the larger region; both click at the centre of the chosen region.)
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

MAX_CLICKS = 20  # NoC's cap (RITM, SimpleClick)
NOC_THRESHOLDS = (0.85, 0.90)
MIOU_CLICKS = (1, 3, 5)
# SAM's box noise (paper, appendix A): per coordinate, std 10% of the box side, at most 20 pixels.
BOX_JITTER, BOX_JITTER_MAX = 0.1, 20.0
AR_MAX_DETS = (10, 100, 1000)


@dataclass(frozen=True)
class Click:
    x: int
    y: int
    positive: bool


@dataclass
class ClickRun:
    """One object's interactive session: the IoU after each click, the clicks, and the IoU of every
    candidate mask of the first click (SAM's multimask output)."""

    ious: list[float] = field(default_factory=list)
    clicks: list[Click] = field(default_factory=list)
    first_candidates: list[float] = field(default_factory=list)


# A predictor takes the clicks so far and returns candidate masks (M, H, W) bool with scores (M,); the
# highest-scoring candidate is its prediction.
Predictor = Callable[[list[Click]], tuple[np.ndarray, np.ndarray]]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def farthest_point(region: np.ndarray) -> tuple[int, int]:
    """(row, col) of the pixel of a non-empty boolean region farthest from its boundary (the image border
    included); the first in row-major order among ties."""
    padded = np.pad(region.astype(np.uint8), 1)
    distance = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[1:-1, 1:-1]
    row, col = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return int(row), int(col)


def next_click(gt: np.ndarray, pred: np.ndarray) -> Click | None:
    """The simulated user's next click on ground truth `gt` given prediction `pred` (both boolean (H, W));
    None when they agree. With an empty `pred` it is the first click."""
    best_area, best = 0, None
    for error, positive in ((gt & ~pred, True), (pred & ~gt, False)):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(error.astype(np.uint8), connectivity=8)
        for c in range(1, n):
            if stats[c, cv2.CC_STAT_AREA] > best_area:
                best_area, best = stats[c, cv2.CC_STAT_AREA], (labels == c, positive)
    if best is None:
        return None
    row, col = farthest_point(best[0])
    return Click(x=col, y=row, positive=best[1])


def simulate_clicks(
    gt: np.ndarray,
    predict: Predictor,
    max_clicks: int = MAX_CLICKS,
    stop_iou: float = max(NOC_THRESHOLDS),
    min_clicks: int = max(MIOU_CLICKS),
) -> ClickRun:
    """Click on `gt` until `max_clicks`, or until the IoU reaches `stop_iou` after at least `min_clicks`
    (later clicks change neither NoC up to `stop_iou` nor mIoU up to `min_clicks`). Once the prediction
    equals `gt` no click is left to make: the IoU stays 1.0 up to `min_clicks`."""
    run = ClickRun()
    pred = np.zeros_like(gt, dtype=bool)
    while len(run.ious) < max_clicks:
        click = next_click(gt, pred)
        if click is None:  # only after a perfect prediction (gt is not empty)
            run.ious += [1.0] * max(0, min(min_clicks, max_clicks) - len(run.ious))
            break
        run.clicks.append(click)
        masks, scores = predict(run.clicks)
        candidates = [iou(m, gt) for m in masks]
        chosen = int(np.argmax(scores))
        if not run.first_candidates:
            run.first_candidates = candidates
        pred = masks[chosen]
        run.ious.append(candidates[chosen])
        if len(run.ious) >= min_clicks and run.ious[-1] >= stop_iou:
            break
    return run


def noc(ious: Sequence[float], threshold: float, max_clicks: int = MAX_CLICKS) -> int:
    """Number of clicks to reach `threshold` IoU: the first k with IoU >= threshold, else `max_clicks`."""
    return next((k for k, v in enumerate(ious[:max_clicks], start=1) if v >= threshold), max_clicks)


def click_metrics(runs: Sequence[ClickRun], max_clicks: int = MAX_CLICKS) -> dict[str, float]:
    """mIoU after 1, 3, 5 clicks, mean NoC@85/90 (capped at `max_clicks`) and NoF (the objects that never
    reach the threshold) over the objects' sessions."""
    out = {f"miou@{k}": float(np.mean([r.ious[k - 1] for r in runs])) for k in MIOU_CLICKS}
    for t in NOC_THRESHOLDS:
        counts = [noc(r.ious, t, max_clicks) for r in runs]
        reached = [any(v >= t for v in r.ious[:max_clicks]) for r in runs]
        out[f"noc@{round(t * 100)}"] = float(np.mean(counts))
        out[f"nof@{round(t * 100)}"] = int(len(runs) - sum(reached))
    return out


def single_click_metrics(runs: Sequence[ClickRun]) -> dict[str, float]:
    """One click at the object's centre: the mIoU of the chosen mask (highest predicted IoU), of the best
    of the candidates (SAM's "oracle"), and the gap between them."""
    chosen = float(np.mean([r.ious[0] for r in runs]))
    oracle = float(np.mean([max(r.first_candidates) for r in runs]))
    return {"center_miou": chosen, "center_oracle_miou": oracle, "center_oracle_gap": oracle - chosen}


def mask_box(mask: np.ndarray) -> np.ndarray:
    """The tight box of a non-empty mask as (x0, y0, x1, y1) pixel indices (x1, y1 the last column and
    row, as SAM's `batched_mask_to_box`), float."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)


def jitter_box(
    box: np.ndarray,
    rng: np.random.Generator,
    size: tuple[int, int],
    fraction: float = BOX_JITTER,
    limit: float = BOX_JITTER_MAX,
) -> np.ndarray:
    """`box` (x0, y0, x1, y1) with each coordinate moved by N(0, (fraction * side)^2), at most `limit`
    pixels, kept inside the (H, W) image and ordered (x0 <= x1, y0 <= y1)."""
    w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
    noise = np.clip(rng.normal(0.0, 1.0, 4) * fraction * np.array([w, h, w, h]), -limit, limit)
    x = np.clip(box[[0, 2]] + noise[[0, 2]], 0, size[1] - 1)
    y = np.clip(box[[1, 3]] + noise[[1, 3]], 0, size[0] - 1)
    return np.array([x.min(), y.min(), x.max(), y.max()])


def mask_ar(
    ground_truth: Sequence[Sequence[dict]],
    predictions: Sequence[Sequence[dict]],
    max_dets: Sequence[int] = AR_MAX_DETS,
) -> dict[str, float]:
    """Class-agnostic mask average recall of automatic masks, as COCO's evaluation computes it (pycocotools
    `COCOeval`, segm, one category): for each k, the share of ground-truth masks matched by one of their
    image's k highest-scoring predictions, averaged over IoU thresholds 0.5:0.05:0.95.

    `ground_truth[i]` holds image i's COCO RLEs; `predictions[i]` its records `{"segmentation": RLE,
    "score": float}`. Returns `{"ar@k": ...}` for each k of `max_dets`."""
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(ground_truth) != len(predictions):
        raise ValueError(f"{len(ground_truth)} images of ground truth but {len(predictions)} of predictions")
    images, gts, dts = [], [], []
    for i, (gt, pred) in enumerate(zip(ground_truth, predictions, strict=True), start=1):
        sizes = [r["size"] for r in gt] + [p["segmentation"]["size"] for p in pred]
        h, w = sizes[0] if sizes else (1, 1)
        images.append({"id": i, "height": int(h), "width": int(w)})
        for rle in gt:  # ids from 1: COCOeval reads a match with id 0 as no match
            gts.append(
                {
                    "id": len(gts) + 1,
                    "image_id": i,
                    "category_id": 1,
                    "segmentation": rle,
                    "area": float(mask_utils.area(rle)),
                    "bbox": mask_utils.toBbox(rle).tolist(),
                    "iscrowd": 0,
                }
            )
        dts += [{"image_id": i, "category_id": 1, **p} for p in pred]
    if not gts:
        raise ValueError("no ground-truth masks to recall")
    keys = [f"ar@{k}" for k in max_dets]
    if not dts:
        return dict.fromkeys(keys, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools reports progress on stdout
        coco = COCO()
        coco.dataset = {"images": images, "annotations": gts, "categories": [{"id": 1, "name": "object"}]}
        coco.createIndex()
        evaluation = COCOeval(coco, coco.loadRes(dts), "segm")
        evaluation.params.useCats = 0
        evaluation.params.maxDets = sorted(max_dets)
        evaluation.params.areaRng, evaluation.params.areaRngLbl = [[0, 1e10]], ["all"]
        evaluation.evaluate()
        evaluation.accumulate()
    recall = evaluation.eval["recall"][:, 0, 0, :]  # (IoU thresholds, max_dets)
    by_k = {k: float(recall[:, j].mean()) for j, k in enumerate(sorted(max_dets))}
    return {f"ar@{k}": by_k[k] for k in max_dets}
