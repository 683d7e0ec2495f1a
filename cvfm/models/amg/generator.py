"""Segment everything: segment-anything's `SamAutomaticMaskGenerator` over the `Segmenter` face.

For each crop (the whole image, then the overlapping crops of `crop_n_layers` layers): embed the crop once,
prompt it with a grid of single points in batches (three candidate masks each), keep the candidates whose
predicted IoU exceeds `pred_iou_thresh` and whose stability score reaches `stability_score_thresh`, drop
masks cut off by the crop's edge, and suppress duplicates by box NMS (by predicted IoU). Then suppress
duplicates across crops preferring smaller crops, and optionally clean small islands and holes.

The stability score is computed on the logits at the original size, as the reference does; only the
predicted-IoU filter runs before upscaling (it reads the scores alone, so the masks upscaled for the
survivors are those the reference keeps; tests/test_segment_auto.py checks it). Masks are run-length
encoded only once box NMS has dropped the duplicates (the reference encodes every candidate), up to
`PENDING_BYTES` of bit-packed masks a crop; the records are the same either way.

`generate_masks_batch` sends the crops of several images through the encoder together: the masks are
those of one image at a time, up to the encoder's float rounding in a larger batch.

Each record is the reference's (`amg.py --convert-to-rle`): `segmentation` (COCO RLE, counts a str),
`area`, `bbox` (XYWH, see masks.py), `predicted_iou`, `point_coords` ([[x, y]]), `stability_score`,
`crop_box` (XYWH).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from PIL import Image
from torchvision.ops import box_area

from cvfm.data.instances import encode_masks
from cvfm.errors import UsageError
from cvfm.models.amg.crops import crop_boxes, layer_grids, near_crop_edge
from cvfm.models.amg.masks import (
    clean_small_regions,
    extent_boxes,
    nms,
    rle_area,
    stability_score,
    xyxy_to_xywh,
)
from cvfm.models.segmenter import ImageEmbedding, Segmenter


@dataclass(frozen=True)
class AutoSettings:
    """The reference defaults (`SamAutomaticMaskGenerator.__init__`, tuned for SAM ViT-H)."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    mask_threshold: float = 0.0

    def __post_init__(self):
        for f in fields(self):
            if f.name != "mask_threshold" and getattr(self, f.name) < 0:
                raise UsageError(f"{f.name} must not be negative, got {getattr(self, f.name)}")
        if self.points_per_batch < 1 or self.crop_n_points_downscale_factor < 1:
            raise UsageError("points_per_batch and crop_n_points_downscale_factor must be at least 1")
        last = int(self.points_per_side / self.crop_n_points_downscale_factor**self.crop_n_layers)
        if last < 1:
            raise UsageError(
                f"points_per_side {self.points_per_side} leaves no points in crop layer {self.crop_n_layers} "
                f"(downscaled by {self.crop_n_points_downscale_factor} a layer)"
            )


# Masks wait bit-packed, not run-length encoded, until NMS has dropped the duplicates: up to this many bytes
# a crop (2 Gi pixels), beyond which every waiting mask is encoded at once.
PENDING_BYTES = 256 * 2**20
CPU_CHUNK = 8  # candidates upscaled and measured together on a CPU (see batch_candidates)


@dataclass(frozen=True, eq=False)
class Pending:
    """The masks of one batch of prompts, not yet run-length encoded: (K, ceil(h w / 8)) uint8, each mask of
    the (h, w) crop bit-packed, the crop at `offset` (x0, y0) of an image of `size` (H, W)."""

    bits: np.ndarray
    crop: tuple[int, int]  # (h, w)
    offset: tuple[int, int]
    size: tuple[int, int]

    def encode(self, rows: list[int]) -> list[dict]:
        """The COCO RLEs (of the whole image) of the masks at `rows`."""
        (ch, cw), (x0, y0), (h, w) = self.crop, self.offset, self.size
        masks = np.unpackbits(self.bits[rows], axis=1, count=ch * cw).reshape(len(rows), ch, cw)
        if (ch, cw) != (h, w):
            whole = np.zeros((len(rows), h, w), dtype=np.uint8)
            whole[:, y0 : y0 + ch, x0 : x0 + cw] = masks
            masks = whole
        return encode_masks(masks)


@dataclass
class Candidates:
    """Masks of one image and what is known of each, in one order (tensors on the CPU; boxes x0, y0, x1, y1
    inclusive, points x, y, both in pixels of the image). A mask is a COCO RLE, or (`Pending`, row) until
    `encoded`."""

    rles: list[dict | tuple[Pending, int]]
    boxes: torch.Tensor  # (N, 4) int64
    iou: torch.Tensor  # (N,) predicted IoU
    stability: torch.Tensor  # (N,)
    points: torch.Tensor  # (N, 2) float64, the prompt
    crop_boxes: torch.Tensor  # (N, 4) int64, x1, y1 exclusive

    def take(self, index: torch.Tensor) -> Candidates:
        """The candidates at `index` (positions, in that order)."""
        index = index.cpu()
        tensors = {f.name: getattr(self, f.name)[index] for f in fields(self) if f.name != "rles"}
        return Candidates(rles=[self.rles[i] for i in index.tolist()], **tensors)

    @staticmethod
    def cat(parts: list[Candidates]) -> Candidates:
        tensors = {f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Candidates)[1:]}
        return Candidates(rles=[r for p in parts for r in p.rles], **tensors)

    def pending_bytes(self) -> int:
        return sum({id(r[0]): r[0].bits.nbytes for r in self.rles if isinstance(r, tuple)}.values())

    def encoded(self) -> Candidates:
        """These candidates with every mask a COCO RLE (each batch's pending masks encoded in one call)."""
        groups: dict[int, tuple[Pending, list[int], list[int]]] = {}
        for i, r in enumerate(self.rles):
            if isinstance(r, tuple):
                pending, row = r
                _, rows, places = groups.setdefault(id(pending), (pending, [], []))
                rows.append(row)
                places.append(i)
        rles = list(self.rles)
        for pending, rows, places in groups.values():
            for i, rle in zip(places, pending.encode(rows), strict=True):
                rles[i] = rle
        return replace(self, rles=rles)


def generate_masks(
    segmenter: Segmenter, image: Image.Image, settings: AutoSettings = AutoSettings()
) -> list[dict]:
    """The records of every mask found in `image` (see the module docstring)."""
    return generate_masks_batch(segmenter, [image], settings)[0]


@torch.no_grad()
def generate_masks_batch(
    segmenter: Segmenter,
    images: list[Image.Image],
    settings: AutoSettings = AutoSettings(),
    crops_per_batch: int = 1,
) -> list[list[dict]]:
    """`generate_masks` for each image, the crops of all images going through the encoder
    `crops_per_batch` at a time."""
    if crops_per_batch < 1:
        raise UsageError(f"crops_per_batch must be at least 1, got {crops_per_batch}")
    s = settings
    grids = layer_grids(s.points_per_side, s.crop_n_layers, s.crop_n_points_downscale_factor)
    images = [im.convert("RGB") for im in images]
    jobs = [
        (i, box, layer)
        for i, im in enumerate(images)
        for box, layer in crop_boxes((im.height, im.width), s.crop_n_layers, s.crop_overlap_ratio)
    ]
    transform, weight = segmenter.preprocess.transform(), next(segmenter.parameters())
    found: list[list[Candidates]] = [[] for _ in images]
    for start in range(0, len(jobs), crops_per_batch):
        chunk = jobs[start : start + crops_per_batch]
        crops = [images[i].crop(box) for i, box, _ in chunk]
        pixels = torch.stack([transform(c) for c in crops]).to(weight.device, weight.dtype)
        embedding = segmenter.embed_image(pixels, [(c.height, c.width) for c in crops])
        for k, (i, box, layer) in enumerate(chunk):
            size = (images[i].height, images[i].width)
            found[i].append(crop_candidates(segmenter, embedding.select(k), box, size, grids[layer], s))
    return [records(merge_crops(f, s)) for f in found]


def crop_candidates(
    segmenter: Segmenter,
    embedding: ImageEmbedding,
    crop_box: list[int],
    image_size: tuple[int, int],
    grid: np.ndarray,
    s: AutoSettings,
) -> Candidates:
    """The masks of one embedded crop, deduplicated by box NMS, in image pixels."""
    x0, y0, x1, y1 = crop_box
    points = torch.from_numpy(grid * np.array([x1 - x0, y1 - y0]))  # float64, crop pixels
    batches = []
    for p in points.split(s.points_per_batch):
        batches.append(batch_candidates(segmenter, embedding, p, crop_box, image_size, s))
        if sum(b.pending_bytes() for b in batches) > PENDING_BYTES:  # memory first: encode what waits
            batches = [b.encoded() for b in batches]
    found = Candidates.cat(batches)
    return found.take(nms(found.boxes, found.iou, s.box_nms_thresh)).encoded()


def decoded_candidates(
    segmenter: Segmenter, embedding: ImageEmbedding, points: torch.Tensor, pred_iou_thresh: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompt each (P, 2) point alone (multimask): the (K, h, w) low-resolution logits, the (K,) predicted
    IoU and the (K, 2) points of the candidates with predicted IoU > `pred_iou_thresh`, in prompt-major
    order. Only those are upscaled."""
    pred = segmenter.decode(embedding, points=points[:, None], multimask=True)
    low, iou = pred.low_res_logits.flatten(0, 1), pred.iou.flatten()
    points = points.repeat_interleave(pred.iou.shape[1], dim=0)
    if pred_iou_thresh > 0:
        keep = iou > pred_iou_thresh
        low, iou, points = low[keep], iou[keep], points[keep.cpu()]
    return low, iou, points


@dataclass
class Measured:
    """Candidates upscaled to the crop's size and measured: which passed the stability filter (K,) bool,
    their stability (k,), boxes (k, 4) in crop pixels and masks as `Pending` keeps them (k, ceil(h w / 8))."""

    passed: torch.Tensor
    stability: torch.Tensor
    boxes: torch.Tensor
    bits: np.ndarray


def measure(segmenter: Segmenter, embedding: ImageEmbedding, low: torch.Tensor, s: AutoSettings) -> Measured:
    """(K, h, w) low-resolution logits upscaled, scored for stability and, those that pass, thresholded."""
    logits = segmenter.upscale(low[:, None], embedding)[:, 0]
    stability = stability_score(logits, s.mask_threshold, s.stability_score_offset)
    passed = stability >= s.stability_score_thresh
    if s.stability_score_thresh <= 0:  # no filter, as the reference: NaN (an empty looser mask) stays too
        passed = torch.ones_like(passed)
    masks = logits[passed] > s.mask_threshold
    pixels = masks.view(torch.uint8)  # the max of 0 / 1 bytes is `any`, many times faster than `any` itself
    boxes = extent_boxes(pixels.amax(2), pixels.amax(1))
    k, h, w = masks.shape
    bits = np.packbits(masks.cpu().numpy().reshape(k, h * w), axis=1)
    return Measured(passed, stability[passed], boxes, bits)


def batch_candidates(
    segmenter: Segmenter,
    embedding: ImageEmbedding,
    points: torch.Tensor,
    crop_box: list[int],
    image_size: tuple[int, int],
    s: AutoSettings,
) -> Candidates:
    """One batch of point prompts in a crop: the masks passing the predicted-IoU and stability filters
    and not cut off by the crop's edge, placed in the whole image.

    On a CPU the candidates are upscaled and measured CPU_CHUNK at a time, so that their full-size logits
    stay in cache between the steps (1.6x faster than the whole batch at once; the same values)."""
    low, iou, points = decoded_candidates(segmenter, embedding, points, s.pred_iou_thresh)
    chunk = CPU_CHUNK if low.device.type == "cpu" else max(len(low), 1)
    parts = [measure(segmenter, embedding, c, s) for c in low.split(chunk)]  # none left: one empty part
    passed = torch.cat([p.passed for p in parts])
    x0, y0, x1, y1 = crop_box
    boxes = torch.cat([p.boxes for p in parts]) + torch.tensor([x0, y0, x0, y0], device=low.device)
    keep = ~near_crop_edge(boxes, crop_box, image_size)
    bits = np.concatenate([p.bits for p in parts])
    pending = Pending(bits[keep.cpu().numpy()], (y1 - y0, x1 - x0), (x0, y0), image_size)
    n = len(pending.bits)
    return Candidates(
        rles=[(pending, i) for i in range(n)],
        boxes=boxes[keep].cpu(),
        iou=iou[passed][keep].float().cpu(),
        stability=torch.cat([p.stability for p in parts])[keep].cpu(),
        points=points[passed.cpu()][keep.cpu()] + torch.tensor([x0, y0]),
        crop_boxes=torch.tensor([crop_box] * n, dtype=torch.long).reshape(n, 4),
    )


def merge_crops(crops: list[Candidates], s: AutoSettings) -> Candidates:
    """All crops' masks of one image, deduplicated across crops (smaller crops first), then cleaned of
    small regions when `min_mask_region_area` > 0."""
    found = Candidates.cat(crops)
    if len(crops) > 1:
        found = found.take(nms(found.boxes, 1 / box_area(found.crop_boxes), s.crop_nms_thresh))
    if s.min_mask_region_area > 0:
        threshold = max(s.box_nms_thresh, s.crop_nms_thresh)
        keep, rles, boxes = clean_small_regions(found.rles, s.min_mask_region_area, threshold)
        found = replace(found, rles=rles, boxes=boxes).take(keep)
    return found


def records(found: Candidates) -> list[dict]:
    """One record per mask, keys and values as segment-anything's generator writes them."""
    boxes, crops = found.boxes.tolist(), found.crop_boxes.tolist()
    iou, stability, points = found.iou.tolist(), found.stability.tolist(), found.points.tolist()
    return [
        {
            "segmentation": rle,
            "area": rle_area(rle),
            "bbox": xyxy_to_xywh(boxes[i]),
            "predicted_iou": iou[i],
            "point_coords": [points[i]],
            "stability_score": stability[i],
            "crop_box": xyxy_to_xywh(crops[i]),
        }
        for i, rle in enumerate(found.rles)
    ]
