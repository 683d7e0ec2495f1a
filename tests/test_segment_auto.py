"""The automatic mask generator: its geometry (grids, crops, edges, NMS across crops, cleanup) on a stand-in
segmenter whose masks are known exactly, and its records, determinism and low-resolution filtering on
cvfm/tiny-sam (random weights: structure and exactness, not quality)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cvfm.data.instances import decode_mask
from cvfm.errors import UsageError
from cvfm.models.amg import generator as amg_generator
from cvfm.models.amg.crops import point_grid
from cvfm.models.amg.generator import decoded_candidates
from cvfm.models.amg.masks import mask_boxes, rle_area, stability_score, xyxy_to_xywh
from cvfm.models.segmenter import ImageEmbedding, MaskPrediction
from cvfm.registry import create_segmenter
from cvfm.segment import AutoSettings, generate_masks, generate_masks_batch

KEYS = ["segmentation", "area", "bbox", "predicted_iou", "point_coords", "stability_score", "crop_box"]


class ColourSegmenter(nn.Module):
    """A stand-in segmenter that knows the answer: a click's first candidate is every pixel of the crop with
    the clicked colour (predicted IoU 0.95, 0 on black), its second the rest (IoU 0.3). Logits are 5 on the
    mask, -5 off it, 0.5 on the mask's first row: its stability score is 1 - (first row) / (area).
    The "low-resolution" logits are already at the crop's size, so `upscale` returns them."""

    PAD = 256

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))  # where the pixels go
        self.preprocess = SimpleNamespace(transform=lambda: self.pad)
        self.embedded: list[list[tuple[int, int]]] = []

    def pad(self, image: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        return nn.functional.pad(x, (0, self.PAD - image.width, 0, self.PAD - image.height))

    def embed_image(self, pixels: torch.Tensor, original_sizes: list[tuple[int, int]]) -> ImageEmbedding:
        self.embedded.append(list(original_sizes))
        return ImageEmbedding(pixels, list(original_sizes), list(original_sizes))

    def decode(
        self, embedding: ImageEmbedding, points: torch.Tensor, labels=None, multimask=True
    ) -> MaskPrediction:
        h, w = embedding.original_sizes[0]
        crop = embedding.features[0, :, :h, :w]
        xy = points[:, 0].long()
        colours = crop[:, xy[:, 1], xy[:, 0]].T  # (P, 3)
        same = (crop[None] == colours[:, :, None, None]).all(1)  # (P, h, w)
        first_row = torch.arange(h)[None, :, None] == same.any(2).float().argmax(1)[:, None, None]
        logits = torch.stack([same, ~same], 1).float() * 10 - 5
        logits[:, 0][same & first_row] = 0.5
        iou = torch.tensor([[0.95, 0.3]]).repeat(len(points), 1)
        iou[colours.sum(1) == 0] = 0.0
        return MaskPrediction(low_res_logits=logits, iou=iou)

    def upscale(self, low_res_logits: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
        return low_res_logits


H, W = 101, 161  # one crop layer: overlap 34, crops 98 x 68 at x 0 / 64, y 0 / 34
RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def _scene(speck: bool = False) -> Image.Image:
    """A (101, 161) black image: a red rectangle A inside the top-left crop (> 20 px from its inner edges),
    a blue one B across the middle (cut by every crop), a green square C inside the bottom-right crop that
    no click of the whole image's grid hits; optionally a 2 x 2 red speck far from A."""
    pixels = np.zeros((H, W, 3), dtype=np.uint8)
    pixels[30:45, 15:50] = RED  # A: rows 30..44, columns 15..49
    pixels[20:80, 50:120] = BLUE  # B: rows 20..79, columns 50..119
    pixels[70:85, 120:135] = GREEN  # C: rows 70..84, columns 120..134
    if speck:
        pixels[90:92, 140:142] = RED
    return Image.fromarray(pixels)


def _mask(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[rows, cols] = True
    return mask


A, B, C = (
    _mask(slice(30, 45), slice(15, 50)),
    _mask(slice(20, 80), slice(50, 120)),
    _mask(slice(70, 85), slice(120, 135)),
)
# the full image's 4 x 4 grid: x (i + 0.5) / 4 * 161, y (j + 0.5) / 4 * 101
B_POINTS = [[60.375, 37.875], [100.625, 37.875], [60.375, 63.125], [100.625, 63.125]]
FAKE = AutoSettings(points_per_side=4, points_per_batch=3, stability_score_thresh=0.9)  # several batches


def _check(record: dict, mask: np.ndarray, crop_box: list[int], points: list[list[float]]) -> None:
    assert list(record) == KEYS
    assert np.array_equal(decode_mask(record["segmentation"]), mask)
    assert record["area"] == int(mask.sum())
    ys, xs = np.nonzero(mask)
    assert record["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]
    first_row = mask[ys.min()].sum()
    assert record["predicted_iou"] == pytest.approx(0.95)
    assert record["stability_score"] == pytest.approx(1 - first_row / mask.sum())
    assert record["crop_box"] == crop_box and record["point_coords"][0] in points


def test_one_crop_finds_each_object_once():
    seg = ColourSegmenter()
    found = generate_masks(seg, _scene(), FAKE)
    assert seg.embedded == [[(H, W)]]
    assert len(found) == 2  # background clicks filtered (IoU 0), B's four clicks deduplicated by NMS
    by_area = sorted(found, key=lambda r: r["area"])
    _check(by_area[0], A, [0, 0, W, H], [[20.125, 37.875]])
    _check(by_area[1], B, [0, 0, W, H], B_POINTS)


def test_crop_layers_prefer_smaller_crops_and_drop_masks_cut_by_a_crop():
    seg = ColourSegmenter()
    found = generate_masks(seg, _scene(), replace(FAKE, crop_n_layers=1))
    assert seg.embedded == [[(H, W)], [(68, 98)], [(67, 98)], [(68, 97)], [(67, 97)]]
    assert len(found) == 3
    # smaller crops first: C from the bottom-right crop (97 x 67 at 64, 34; its grid: x 64 + (i + 0.5) / 4
    # * 97, y 34 + (j + 0.5) / 4 * 67), A, whole in the top-left crop, from it (x (i + 0.5) / 4 * 98,
    # y (j + 0.5) / 4 * 68) rather than from the whole image; B, cut by every crop, from the whole image
    _check(found[0], C, [64, 34, 97, 67], [[124.625, 75.875]])
    _check(found[1], A, [0, 0, 98, 68], [[36.75, 42.5]])
    _check(found[2], B, [0, 0, W, H], B_POINTS)


def test_min_mask_region_area_removes_a_speck_then_deduplicates():
    seg, settings = ColourSegmenter(), replace(FAKE, crop_n_layers=1)
    speckled = A | _mask(slice(90, 92), slice(140, 142))
    found = generate_masks(seg, _scene(speck=True), settings)
    assert sorted(rle_area(r["segmentation"]) for r in found) == sorted(m.sum() for m in (A, speckled, B, C))
    cleaned = generate_masks(seg, _scene(speck=True), replace(settings, min_mask_region_area=5))
    assert len(cleaned) == 3  # the whole image's A + speck, cleaned, duplicates the crop's A: dropped
    cleaned.sort(key=lambda r: r["area"])
    _check(cleaned[0], C, [64, 34, 97, 67], [[124.625, 75.875]])
    _check(cleaned[1], A, [0, 0, 98, 68], [[36.75, 42.5]])
    _check(cleaned[2], B, [0, 0, W, H], B_POINTS)


def test_images_share_encoder_batches():
    seg = ColourSegmenter()
    one = [generate_masks(seg, im, FAKE) for im in (_scene(), _scene(speck=True))]
    seg.embedded.clear()
    both = generate_masks_batch(seg, [_scene(), _scene(speck=True)], FAKE, crops_per_batch=2)
    assert seg.embedded == [[(H, W), (H, W)]] and both == one


def test_settings_defaults_are_the_references_and_nonsense_is_refused():
    s = AutoSettings()
    assert (s.points_per_side, s.points_per_batch, s.pred_iou_thresh, s.stability_score_thresh) == (
        32,
        64,
        0.88,
        0.95,
    )
    assert (s.stability_score_offset, s.box_nms_thresh, s.crop_n_layers, s.crop_nms_thresh) == (
        1.0,
        0.7,
        0,
        0.7,
    )
    assert s.crop_overlap_ratio == 512 / 1500 and isinstance(s.crop_overlap_ratio, float)
    assert (s.crop_n_points_downscale_factor, s.min_mask_region_area, s.mask_threshold) == (1, 0, 0.0)
    with pytest.raises(UsageError, match="points_per_batch"):
        AutoSettings(points_per_batch=0)
    with pytest.raises(UsageError, match="box_nms_thresh must not be negative"):
        AutoSettings(box_nms_thresh=-0.1)
    with pytest.raises(UsageError, match="leaves no points in crop layer 2"):
        AutoSettings(points_per_side=3, crop_n_layers=2, crop_n_points_downscale_factor=2)
    AutoSettings(mask_threshold=-1.0)  # a logit threshold may be negative


# cvfm/tiny-sam, its predicted IoU shifted up so that a positive threshold keeps some candidates, and
# thresholds to suit its small random logits
TINY = AutoSettings(
    points_per_side=4,
    pred_iou_thresh=0.1,
    stability_score_thresh=0.05,
    stability_score_offset=0.05,
    box_nms_thresh=1.0,  # its random masks all cover most of the image: keep them to check each
)


@pytest.fixture(scope="module")
def tiny():
    seg = create_segmenter("cvfm/tiny-sam")
    with torch.no_grad():
        seg.model.mask_decoder.iou_prediction_head.proj_out.bias += 0.3
    return seg


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Blocks of random colour (13 x 10 px), cut to an odd, non-square size."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (h // 10 + 1, w // 13 + 1, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((10, 13, 1), dtype=np.uint8))[:h, :w])


def test_tiny_sam_records_are_amg_records_and_deterministic(tiny):
    photo = _photo(203, 77)
    found = generate_masks(tiny, photo, TINY)
    assert 2 <= len(found) < 48 and found == generate_masks(tiny, photo, TINY)
    grid = (point_grid(4) * [203, 77]).tolist()
    for r in found:
        assert list(r) == KEYS
        mask = decode_mask(r["segmentation"])
        assert mask.shape == (77, 203) and r["segmentation"]["size"] == [77, 203]
        assert isinstance(r["segmentation"]["counts"], str)
        assert isinstance(r["area"], int) and r["area"] == mask.sum() > 0
        assert all(isinstance(v, int) for v in r["bbox"])
        assert r["bbox"] == xyxy_to_xywh(mask_boxes(torch.from_numpy(mask)[None])[0].tolist())
        assert isinstance(r["predicted_iou"], float) and r["predicted_iou"] > TINY.pred_iou_thresh
        assert isinstance(r["stability_score"], float) and r["stability_score"] >= TINY.stability_score_thresh
        assert r["point_coords"][0] in grid and r["crop_box"] == [0, 0, 203, 77]
    assert len({r["segmentation"]["counts"] for r in found}) == len(found)


def test_low_resolution_iou_filter_equals_filtering_at_full_resolution(tiny):
    photo = _photo(203, 77, seed=1)
    points = torch.from_numpy(point_grid(4) * [203, 77])
    with torch.no_grad():
        emb = tiny.embed_image(tiny.preprocess.transform()(photo)[None], [(77, 203)])
        low, iou, kept_points = decoded_candidates(tiny, emb, points, TINY.pred_iou_thresh)
        logits = tiny.upscale(low[:, None], emb)[:, 0]
        # the reference: every candidate upscaled, then filtered by predicted IoU
        pred = tiny.decode(emb, points=points[:, None], multimask=True)
        each = tiny.upscale(pred.low_res_logits.flatten(0, 1)[:, None], emb)[:, 0]
        full = tiny.upscale(pred.low_res_logits, emb).flatten(0, 1)  # segment-anything's (P, 3) layout
        keep = pred.iou.flatten() > TINY.pred_iou_thresh
    assert 0 < keep.sum() < len(keep)
    assert torch.equal(logits, each[keep]) and torch.equal(iou, pred.iou.flatten()[keep])
    assert torch.equal(kept_points, points.repeat_interleave(3, 0)[keep])
    # the resize kernel may round differently for 3 channels than for 1: the same masks, logits within 1e-6
    torch.testing.assert_close(logits, full[keep], rtol=0, atol=1e-6)
    assert torch.equal(logits > 0, full[keep] > 0)
    offset = TINY.stability_score_offset
    assert torch.equal(stability_score(logits, 0.0, offset), stability_score(full, 0.0, offset)[keep])


def test_tiny_sam_crop_layers_and_shared_encoder_batches(tiny, monkeypatch):
    photos = [_photo(203, 77, seed=2), _photo(90, 131, seed=3)]
    settings = replace(TINY, crop_n_layers=1)
    one = [generate_masks(tiny, p, settings) for p in photos]
    calls, embed = [], tiny.embed_image
    monkeypatch.setattr(
        tiny, "embed_image", lambda pixels, sizes: calls.append(sizes) or embed(pixels, sizes)
    )
    both = generate_masks_batch(tiny, photos, settings, crops_per_batch=4)
    assert [len(c) for c in calls] == [4, 4, 2]  # 5 crops an image
    # 77 x 203: the image, then crops of 52 x 115 (overlap int(512 / 1500 * 77) = 26), the 5th is the next
    # image's whole
    assert calls[0] == [(77, 203), (52, 115), (51, 115), (52, 114)] and calls[1][1] == (131, 90)
    assert [len(f) for f in both] == [len(f) for f in one] and sum(map(len, one)) > 0
    for mine, alone in zip(both, one, strict=True):
        for r, q in zip(mine, alone, strict=True):  # a batch of 4 rounds the encoder's floats differently
            assert r["segmentation"] == q["segmentation"] and r["bbox"] == q["bbox"]
            assert r["crop_box"] == q["crop_box"] and r["point_coords"] == q["point_coords"]
            assert r["predicted_iou"] == pytest.approx(q["predicted_iou"], abs=1e-5)


class ReferencePredictor:
    """segment-anything's `SamPredictor` face over a cvfm Segmenter, for its own mask generator: points stay
    in the crop's pixels (the Segmenter maps them to its input)."""

    def __init__(self, segmenter):
        self.segmenter, self.device = segmenter, torch.device("cpu")
        self.transform = SimpleNamespace(apply_coords=lambda points, size: points)
        self.model = SimpleNamespace(mask_threshold=0.0)

    def set_image(self, image: np.ndarray) -> None:
        crop = Image.fromarray(image)
        pixels = self.segmenter.preprocess.transform()(crop)[None].float()
        self.embedding = self.segmenter.embed_image(pixels, [(crop.height, crop.width)])

    def reset_image(self) -> None:
        self.embedding = None

    def predict_torch(self, points, labels, multimask_output=True, return_logits=True):
        pred = self.segmenter.decode(self.embedding, points=points, labels=labels, multimask=multimask_output)
        return self.segmenter.upscale(pred.low_res_logits, self.embedding), pred.iou, pred.low_res_logits


@pytest.mark.parametrize("pending_bytes", [amg_generator.PENDING_BYTES, 0])
def test_records_equal_segment_anythings_own_generator(tiny, pending_bytes, monkeypatch):
    """segment-anything's SamAutomaticMaskGenerator (pip segment-anything) on the same segmenter gives the
    same records, value for value (the dev extra installs segment-anything); also when the memory budget
    makes every batch encode its masks at once instead of after NMS."""
    import segment_anything.automatic_mask_generator as reference

    monkeypatch.setattr(amg_generator, "PENDING_BYTES", pending_bytes)

    cases = [
        (ColourSegmenter(), _scene(speck=True), replace(FAKE, crop_n_layers=1, min_mask_region_area=5)),
        (
            ColourSegmenter(),
            _scene(speck=True),
            replace(FAKE, crop_n_layers=2, crop_n_points_downscale_factor=2),
        ),
        (tiny, _photo(203, 77), TINY),
        (
            tiny,
            _photo(160, 203, 3),
            replace(TINY, crop_n_layers=1, min_mask_region_area=25, box_nms_thresh=0.95),
        ),
        (
            tiny,
            _photo(99, 61, 4),
            replace(TINY, pred_iou_thresh=0, stability_score_thresh=0, box_nms_thresh=0.7),
        ),
    ]
    for segmenter, image, settings in cases:
        kwargs = {k: v for k, v in settings.__dict__.items() if k != "mask_threshold"}
        model = SimpleNamespace(image_encoder=SimpleNamespace(img_size=1024))  # only its predictor reads it
        generator = reference.SamAutomaticMaskGenerator(model, output_mode="coco_rle", **kwargs)
        generator.predictor = ReferencePredictor(segmenter)
        with torch.no_grad():
            theirs = generator.generate(np.array(image))
        ours = generate_masks(segmenter, image, settings)
        assert len(ours) > 0 and ours == theirs


def test_no_candidate_left_by_either_filter_gives_no_records(tiny):
    photo = _photo(99, 61, 5)
    assert generate_masks(tiny, photo, replace(TINY, pred_iou_thresh=5.0)) == []  # IoU filter: none decoded
    assert generate_masks(tiny, photo, replace(TINY, pred_iou_thresh=0, stability_score_thresh=1.01)) == []
