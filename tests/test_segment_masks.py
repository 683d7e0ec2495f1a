"""Mask utilities of `cvfm segment`: RLE through pycocotools, boxes, stability score, NMS, small-region
cleanup, against pycocotools / torchvision and hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torchvision.ops import nms as torchvision_nms

from cvfm.data.instances import decode_mask, encode_masks
from cvfm.models.amg.crops import crop_boxes, layer_grids, near_crop_edge, point_grid
from cvfm.models.amg.masks import (
    clean_small_regions,
    extent_boxes,
    mask_boxes,
    nms,
    remove_small_regions,
    rle_area,
    stability_score,
    xyxy_to_xywh,
)


def _blobs(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """n random masks of a few rectangles each, plus one empty mask."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n + 1, h, w), dtype=bool)
    for m in masks[:n]:
        for _ in range(3):
            y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
            m[y : y + rng.integers(1, h - y), x : x + rng.integers(1, w - x)] = True
    return masks


def test_rle_round_trip_equals_pycocotools_on_odd_non_square_masks():
    masks = _blobs(4, 37, 53)
    rles = encode_masks(masks)
    theirs = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    assert [r["counts"] for r in rles] == [t["counts"].decode() for t in theirs]
    assert all(r["size"] == [37, 53] and isinstance(r["counts"], str) for r in rles)
    json.dumps(rles)  # JSON-ready
    for mask, rle, their in zip(masks, rles, theirs, strict=True):
        assert decode_mask(rle).dtype == bool and np.array_equal(decode_mask(rle), mask)
        assert np.array_equal(mask_utils.decode(rle), mask.astype(np.uint8))
        assert rle_area(rle) == int(mask_utils.area(their)) == int(mask.sum())
    assert encode_masks(np.zeros((0, 5, 7), dtype=bool)) == []


def test_boxes_are_inclusive_and_xywh_is_one_short_of_pycocotools():
    masks = _blobs(4, 37, 53, seed=1)
    boxes = mask_boxes(torch.from_numpy(masks))
    assert boxes.dtype == torch.long and boxes.shape == (5, 4)
    for mask, box in zip(masks[:-1], boxes.tolist()[:-1], strict=True):
        ys, xs = np.nonzero(mask)
        assert box == [xs.min(), ys.min(), xs.max(), ys.max()]
        coco = mask_utils.toBbox(encode_masks(mask[None])[0]).tolist()
        assert xyxy_to_xywh(box) == [coco[0], coco[1], coco[2] - 1, coco[3] - 1]
    assert boxes[-1].tolist() == [0, 0, 0, 0]  # the empty mask
    one = np.zeros((1, 6, 9), dtype=bool)
    one[0, 2:5, 3:8] = True  # rows 2..4, columns 3..7
    assert mask_boxes(torch.from_numpy(one)).tolist() == [[3, 2, 7, 4]]
    assert xyxy_to_xywh([3, 2, 7, 4]) == [3, 2, 4, 2]


def test_boxes_from_rows_and_columns_equal_boxes_from_masks():
    masks = torch.from_numpy(_blobs(6, 37, 53, seed=2))  # the last one empty
    assert torch.equal(extent_boxes(masks.any(2), masks.any(1)), mask_boxes(masks))
    assert extent_boxes(masks.any(2), masks.any(1))[-1].tolist() == [0, 0, 0, 0]
    assert extent_boxes(masks[:0].any(2), masks[:0].any(1)).shape == (0, 4)


def test_stability_score_by_hand():
    logits = torch.tensor(
        [
            [[3.0, 0.5, -0.5], [1.5, -2.0, 0.2]],
            [[-3.0, -1.5, 0.9], [2.0, 1.2, -0.99]],
        ]
    )
    # threshold 0, offset 1: mask 0 has 2 logits > 1 (3, 1.5) and 5 > -1 (all but -2): 2 / 5;
    # mask 1 has 2 > 1 (2, 1.2) and 4 > -1 (0.9, 2, 1.2, -0.99): 2 / 4
    assert stability_score(logits, 0.0, 1.0).tolist() == pytest.approx([0.4, 0.5])
    # threshold 0.5, offset 0.25: mask 0: > 0.75 {3, 1.5} = 2, > 0.25 {3, 0.5, 1.5} = 3: 2 / 3;
    # mask 1: > 0.75 {0.9, 2, 1.2} = 3, > 0.25 the same 3: 1
    assert stability_score(logits, 0.5, 0.25).tolist() == pytest.approx([2 / 3, 1.0])
    assert stability_score(logits[None], 0.0, 1.0).shape == (1, 2)


def test_nms_keeps_what_torchvision_keeps():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10]])
    scores = torch.tensor([0.9, 0.95, 0.7, 0.5])
    # boxes 0 and 1 overlap by 81 / 119 = 0.68; box 3 is box 0
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert nms(boxes, scores, 0.7).tolist() == [1, 0, 2]
    rng = torch.Generator().manual_seed(0)
    xy = torch.randint(0, 90, (200, 2), generator=rng)
    wh = torch.randint(1, 40, (200, 2), generator=rng)
    random_boxes, random_scores = torch.cat([xy, xy + wh], 1), torch.rand(200, generator=rng)
    for t in (0.3, 0.7):
        ours = nms(random_boxes, random_scores, t)
        assert torch.equal(ours, torchvision_nms(random_boxes.float(), random_scores, t))
        assert 0 < len(ours) < 200


def _hand_made_mask() -> np.ndarray:
    """A 40 x 50 mask: a 20 x 20 square with a 2 x 2 hole, a 2 x 3 island, a 1-pixel diagonal neighbour."""
    mask = np.zeros((40, 50), dtype=bool)
    mask[5:25, 5:25] = True
    mask[10:12, 14:16] = False  # the hole (4 px)
    mask[30:32, 40:43] = True  # the island (6 px)
    mask[25, 25] = True  # touches the square by a corner: 8-connected, part of it
    return mask


def test_small_holes_and_islands_are_removed_big_regions_kept():
    mask = _hand_made_mask()
    filled, changed = remove_small_regions(mask, 10, "holes")
    assert changed and filled[10:12, 14:16].all() and (filled & ~mask).sum() == 4
    cleaned, changed = remove_small_regions(filled, 10, "islands")
    assert changed and not cleaned[30:32, 40:43].any()
    expected = np.zeros_like(mask)
    expected[5:25, 5:25] = True
    expected[25, 25] = True
    assert np.array_equal(cleaned, expected)
    same, changed = remove_small_regions(expected, 10, "islands")
    assert not changed and same is expected
    # min area 5: the 4 px hole is small, the 6 px island is not
    same, changed = remove_small_regions(mask, 5, "islands")
    assert not changed and same is mask
    # every island small: the largest stays
    islands = np.zeros((9, 9), dtype=bool)
    islands[0, 0], islands[4:6, 4:6] = True, True
    kept, changed = remove_small_regions(islands, 100, "islands")
    assert changed and kept.sum() == 4 and kept[4:6, 4:6].all()


def test_cleanup_rescores_by_nms_preferring_unchanged_masks():
    clean = np.zeros((40, 50), dtype=bool)
    clean[5:25, 5:25] = True
    clean[25, 25] = True
    dirty = _hand_made_mask()  # cleans to `clean`: a duplicate after cleaning
    far = np.zeros((40, 50), dtype=bool)
    far[30:38, 30:45] = True
    rles = encode_masks(np.stack([dirty, clean, far]))
    keep, out, boxes = clean_small_regions(rles, 10, 0.7)
    assert keep.tolist() == [1, 2]  # unchanged masks (score 1) first; the changed duplicate is dropped
    assert out[1] is rles[1] and out[2] is rles[2]
    assert np.array_equal(decode_mask(out[0]), clean)  # the changed mask re-encoded
    assert boxes.tolist() == [[5, 5, 25, 25], [5, 5, 25, 25], [30, 30, 44, 37]]
    keep, out, _ = clean_small_regions(rles[::2], 10, 0.7)
    assert keep.tolist() == [1, 0] and np.array_equal(decode_mask(out[0]), clean)
    assert clean_small_regions([], 10, 0.7)[0].tolist() == []


def test_point_grids_and_crop_boxes_by_hand():
    assert point_grid(2).tolist() == [[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]
    assert [len(g) for g in layer_grids(8, 2, 2)] == [64, 16, 4]
    # 100 x 150 (H x W), one layer: overlap int(512 / 1500 * 100) = 34, crops ceil((34 + 150) / 2) = 92
    # wide, ceil((34 + 100) / 2) = 67 high, starting at 0 and 92 - 34 = 58 / 67 - 34 = 33
    crops = crop_boxes((100, 150), 1, 512 / 1500)
    assert crops == [
        ([0, 0, 150, 100], 0),
        ([0, 0, 92, 67], 1),
        ([0, 33, 92, 100], 1),
        ([58, 0, 150, 67], 1),
        ([58, 33, 150, 100], 1),
    ]
    assert len(crop_boxes((100, 150), 2, 512 / 1500)) == 1 + 4 + 16


def test_near_crop_edge_ignores_image_edges():
    crop = [58, 0, 150, 67]  # the top-right crop of a 100 x 150 image
    boxes = torch.tensor(
        [
            [60, 10, 100, 40],  # within 20 px of the crop's left edge (not an image edge)
            [90, 0, 149, 30],  # on the image's top and right edges only
            [100, 10, 130, 50],  # within 20 px of the crop's bottom edge
            [90, 10, 120, 40],  # inside
        ]
    )
    assert near_crop_edge(boxes, crop, (100, 150)).tolist() == [True, False, True, False]
    assert not near_crop_edge(boxes, [0, 0, 150, 100], (100, 150)).any()
