"""Segmentation metrics on hand-made masks, values worked out by hand; the SAM click loop; the CLI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from clitools import assert_usage_error, one_json_line
from pycocotools import mask as mask_utils

from cvfm.data.coco import write_coco
from cvfm.data.instances import encode_mask, rle_target
from cvfm.data.masks_source import open_masks
from cvfm.data.sources import subset
from cvfm.eval.seg_run import SamClicks, evaluate_segmentation
from cvfm.eval.segmentation import (
    Click,
    click_metrics,
    iou,
    jitter_box,
    mask_ar,
    mask_box,
    next_click,
    noc,
    simulate_clicks,
    single_click_metrics,
)
from cvfm.models.amg import AutoSettings, generate_masks


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """One intra-op thread (OMP_NUM_THREADS makes the evaluation keep it): the click loop is hundreds of
    tiny decodes, and on a small shared CPU a second thread waiting for a busy core made it 5-15x slower."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rect(shape: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """A boolean mask of `shape` with the rectangle rows[0]..rows[1], cols[0]..cols[1] (inclusive) set."""
    m = np.zeros(shape, dtype=bool)
    m[rows[0] : rows[1] + 1, cols[0] : cols[1] + 1] = True
    return m


def test_iou_by_hand():
    a, b = rect((4, 4), (0, 1), (0, 1)), rect((4, 4), (1, 2), (0, 1))  # 4 and 4 pixels, 2 shared
    assert iou(a, b) == pytest.approx(2 / 6)
    assert iou(a, a) == 1.0 and iou(a, ~a) == 0.0
    assert iou(np.zeros((3, 3), bool), np.zeros((3, 3), bool)) == 1.0


def test_first_click_is_the_point_farthest_from_the_boundary():
    # a 7x7 square: its centre (row 5, col 6) is 4 pixels from the nearest background pixel
    square = rect((12, 14), (2, 8), (3, 9))
    assert next_click(square, np.zeros_like(square)) == Click(x=6, y=5, positive=True)
    # touching the image's corner: the border counts as boundary (padding), so the centre, not (0, 0)
    corner = rect((10, 10), (0, 4), (0, 4))
    assert next_click(corner, np.zeros_like(corner)) == Click(x=2, y=2, positive=True)
    assert next_click(square, square) is None


def test_next_click_goes_into_the_largest_error_region():
    gt = rect((16, 16), (2, 7), (2, 7))  # 36 pixels
    pred = rect((16, 16), (2, 7), (2, 4))  # misses rows 2-7, cols 5-7: 18 pixels
    # a 5x5 false positive (25 pixels) outweighs the 18 missed: a negative click at its centre
    spill = pred | rect((16, 16), (9, 13), (9, 13))
    assert next_click(gt, spill) == Click(x=11, y=11, positive=False)
    # a 4x4 one (16 pixels) does not: a positive click in the missed strip, 2 pixels from its boundary
    # (cols 4 and 8, rows 1 and 8); rows 3-6 of col 6 tie, the first in row-major order wins
    small = pred | rect((16, 16), (10, 13), (10, 13))
    assert next_click(gt, small) == Click(x=6, y=3, positive=True)
    # two missed pieces: the larger is clicked, whatever their order
    two = rect((16, 16), (0, 1), (0, 1)) | rect((16, 16), (10, 14), (10, 14))
    assert next_click(two, np.zeros_like(two)) == Click(x=12, y=12, positive=True)


def _components(gt: np.ndarray) -> list[np.ndarray]:
    import cv2

    n, labels = cv2.connectedComponents(gt.astype(np.uint8), connectivity=8)
    return [labels == c for c in range(1, n)]


def test_click_session_with_a_scripted_predictor():
    """A predictor that returns the ground-truth pieces holding a positive click; at the first click it
    offers that piece (score 0.4) and the whole image (score 0.6), so the worse candidate is chosen."""
    gt = rect((14, 14), (1, 6), (1, 6)) | rect((14, 14), (9, 11), (9, 11))  # 36 + 9 pixels
    pieces = _components(gt)

    def predict(clicks):
        grown = np.zeros_like(gt)
        for piece in pieces:
            if any(c.positive and piece[c.y, c.x] for c in clicks):
                grown |= piece
        if len(clicks) == 1:
            return np.stack([grown, np.ones_like(gt)]), np.array([0.4, 0.6])
        return grown[None], np.array([1.0])

    run = simulate_clicks(gt, predict)
    # click 1: centre of the large piece (rows/cols 3-4 tie at distance 3: (3, 3) first); the whole image
    # is chosen, IoU 45/196. Click 2: a negative one in the spill; the large piece alone, IoU 36/45.
    # Click 3: the small piece's centre; IoU 1. Then nothing is left to correct: 1.0 up to click 5.
    assert run.clicks[0] == Click(x=3, y=3, positive=True)
    assert not run.clicks[1].positive and not gt[run.clicks[1].y, run.clicks[1].x]
    assert run.clicks[2] == Click(x=10, y=10, positive=True) and len(run.clicks) == 3
    assert run.ious == pytest.approx([45 / 196, 36 / 45, 1.0, 1.0, 1.0])
    assert run.first_candidates == pytest.approx([36 / 45, 45 / 196])

    never = simulate_clicks(gt, lambda clicks: (np.zeros_like(gt)[None], np.array([0.5])))
    assert never.ious == [0.0] * 20 and len(never.clicks) == 20

    metrics = click_metrics([run, never])
    assert metrics["miou@1"] == pytest.approx(45 / 196 / 2)
    assert metrics["miou@3"] == metrics["miou@5"] == pytest.approx(0.5)
    assert metrics["noc@85"] == metrics["noc@90"] == pytest.approx((3 + 20) / 2)
    assert metrics["nof@85"] == metrics["nof@90"] == 1
    single = single_click_metrics([run])
    assert single["center_miou"] == pytest.approx(45 / 196)
    assert single["center_oracle_miou"] == pytest.approx(0.8)
    assert single["center_oracle_gap"] == pytest.approx(0.8 - 45 / 196)


def test_session_stops_once_the_last_threshold_is_reached_after_five_clicks():
    gt = rect((8, 8), (2, 5), (2, 5))  # 16 pixels

    def predict(clicks):  # 8 spilled pixels (IoU 16/24), then always 1 (IoU 16/17 = 0.94), never exact
        spill = rect((8, 8), (7, 7), (0, 7) if len(clicks) == 1 else (7, 7))
        return (gt | spill)[None], np.array([1.0])

    run = simulate_clicks(gt, predict)
    assert run.ious == pytest.approx([16 / 24] + [16 / 17] * 4)  # over 0.9 at click 2, stopped at 5, not 20
    assert [c.positive for c in run.clicks] == [True] + [False] * 4
    assert len(simulate_clicks(gt, predict, max_clicks=3, min_clicks=3).ious) == 3


def test_noc_by_hand():
    assert noc([0.5, 0.86, 0.95], 0.85) == 2
    assert noc([0.5, 0.86, 0.95], 0.90) == 3
    assert noc([0.5] * 20, 0.85) == 20
    assert noc([0.5] * 24 + [0.95], 0.90) == 20  # reached only after the cap


def test_mask_box_and_jittered_boxes():
    ell = rect((10, 12), (2, 7), (3, 4)) | rect((10, 12), (6, 7), (3, 9))
    box = mask_box(ell)
    assert box.tolist() == [3, 2, 9, 7]  # x0, y0, x1, y1: first/last column and row
    rng = np.random.default_rng(0)
    assert jitter_box(box, rng, (10, 12), fraction=0.0).tolist() == box.tolist()
    a = jitter_box(box, np.random.default_rng(5), (10, 12))
    assert np.array_equal(a, jitter_box(box, np.random.default_rng(5), (10, 12)))  # seeded
    assert a[0] <= a[2] and a[1] <= a[3] and a.min() >= 0 and a[[0, 2]].max() <= 11 and a[[1, 3]].max() <= 9
    # the noise: std 10% of the side (here 41 px wide, 101 high), each coordinate at most 20 px
    big = np.array([100.0, 100.0, 140.0, 200.0])
    moves = np.array([jitter_box(big, rng, (1000, 1000)) - big for _ in range(4000)])
    assert np.abs(moves).max() <= 20
    assert moves[:, 0].std() == pytest.approx(4.1, rel=0.06)
    assert 0.03 < np.mean(np.abs(moves[:, [1, 3]]) == 20) < 0.07  # P(|N(0, 10.1)| > 20) = 0.048


def test_mask_ar_by_hand():
    """Image 1: A (4x4) predicted exactly twice (scores 0.95, 0.9: the second is a duplicate and matches
    nothing) and B (5x5) by a 4x4 piece of it (IoU 16/25 = 0.64, score 0.8); image 2: C, not predicted.
    At 0.5, 0.55, 0.6 both A and B are found, at 0.65 ... 0.95 only A."""
    a, b = rect((10, 10), (0, 3), (0, 3)), rect((10, 10), (5, 9), (5, 9))
    piece, c = rect((10, 10), (5, 8), (5, 8)), rect((8, 12), (2, 5), (2, 5))
    gt = [[encode_mask(a), encode_mask(b)], [encode_mask(c)]]
    pred = [
        [
            {"segmentation": encode_mask(a), "score": 0.9},
            {"segmentation": encode_mask(piece), "score": 0.8},
            {"segmentation": encode_mask(a), "score": 0.95},
        ],
        [],
    ]
    ar = mask_ar(gt[:1], pred[:1], max_dets=(1, 2, 3))
    assert ar == pytest.approx({"ar@1": 0.5, "ar@2": 0.5, "ar@3": (3 * 1 + 7 * 0.5) / 10})
    ar = mask_ar(gt, pred, max_dets=(1, 3))
    assert ar == pytest.approx({"ar@1": 1 / 3, "ar@3": (3 * 2 / 3 + 7 * 1 / 3) / 10})
    # masks are ranked by score: with B's piece first, one mask per image finds only B, at 3 thresholds
    ranked = [[{**pred[0][1], "score": 0.99}, *pred[0][:1]]]
    assert mask_ar(gt[:1], ranked, max_dets=(1,)) == pytest.approx({"ar@1": 3 * 0.5 / 10})
    assert mask_ar(gt, [[], []]) == {"ar@10": 0.0, "ar@100": 0.0, "ar@1000": 0.0}
    with pytest.raises(ValueError, match="2 images of ground truth but 1"):
        mask_ar(gt, pred[:1])


# ------------------------------------------------------------------------------------ with a segmenter


@pytest.fixture(scope="module")
def tiny():
    from cvfm.registry import create_segmenter

    return create_segmenter("cvfm/tiny-sam")


def test_sam_clicks_feed_the_chosen_low_res_mask_back(tiny):
    """First click: three candidates; later: one mask from every click plus the chosen logits."""
    photo = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        emb = tiny.embed_image(photo, [(96, 128)])
        session = SamClicks(tiny, emb)
        masks, scores = session([Click(40, 30, True)])
        assert masks.shape == (3, 96, 128) and masks.dtype == bool and scores.shape == (3,)
        first = tiny.decode(emb, points=torch.tensor([[[40.0, 30.0]]]), multimask=True)
        best = first.low_res_logits[0, first.iou[0].argmax()][None]
        clicks = [Click(40, 30, True), Click(90, 70, False)]
        masks, scores = session(clicks)
        again = tiny.decode(
            emb,
            points=torch.tensor([[[40.0, 30.0], [90.0, 70.0]]]),
            labels=torch.tensor([[1, 0]]),
            mask_input=best,
            multimask=False,
        )
        expected = tiny.upscale(again.low_res_logits, emb)[0] > 0
    assert masks.shape == (1, 96, 128)
    assert np.array_equal(masks, expected.numpy())
    assert scores == pytest.approx(again.iou[0].numpy())


def test_cli_scores_a_few_scenes(cli):
    command = ("evaluate", "segmentation", "cvfm/tiny-sam", "--data", "builtin:animal-scenes")
    rec = one_json_line(cli(*command, "--limit", "2"))
    objects = sum(len(it.target["masks"]) for it in open_masks(command[-1], split="test").items[:2])
    assert rec["task"] == "segmentation" and rec["model"] == "cvfm/tiny-sam"
    assert rec["data"] == {"split": "test", "images": 2, "instances": objects, "skipped": []}
    m = rec["metrics"]
    keys = ["center_miou", "center_oracle_miou", "box_miou", "box_jitter_miou", "miou@1", "miou@3", "miou@5"]
    assert all(0.0 <= m[k] <= 1.0 for k in keys)
    assert m["miou@1"] == m["center_miou"]
    assert m["center_oracle_gap"] == pytest.approx(m["center_oracle_miou"] - m["center_miou"])
    assert m["center_oracle_gap"] >= 0
    assert all(1 <= m[f"noc@{t}"] <= 20 and 0 <= m[f"nof@{t}"] <= objects for t in (85, 90))
    assert m["noc@85"] <= m["noc@90"]
    assert rec["protocol"]["max_clicks"] == 20
    assert_usage_error(
        cli(*command, "--prompts", "lasso"), "unknown prompts lasso: choose from center, box, clicks, auto"
    )
    help_text = cli("evaluate", "segmentation", "--help").out
    assert "builtin:animal-scenes" in help_text and "NoC@85/90" in help_text


def test_a_coco_export_scores_as_the_built_in_set(tiny, tmp_path):
    """The same scenes through write_coco and the COCO reader give the same numbers."""
    scenes = subset(open_masks("builtin:animal-scenes", split="test"), range(2))
    folder = write_coco(scenes, tmp_path / "coco")
    kw = {"prompts": ("center", "box"), "limit": 2, "device": "cpu"}
    direct = evaluate_segmentation(tiny, "builtin:animal-scenes", **kw)
    exported = evaluate_segmentation(tiny, str(folder / "annotations.json"), **kw)
    assert exported["metrics"] == pytest.approx(direct["metrics"], abs=1e-6)
    assert exported["data"]["instances"] == direct["data"]["instances"]
    assert set(direct["metrics"]) == {
        "center_miou",
        "center_oracle_miou",
        "center_oracle_gap",
        "box_miou",
        "box_jitter_miou",
    }


# A random tiny-sam passes these (no NMS): 48 proposals an image, not good ones.
AUTO = AutoSettings(points_per_side=4, pred_iou_thresh=0, stability_score_thresh=0, box_nms_thresh=1.0)
AUTO_KNOBS = ("--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0")


def _proposals(segmenter, scenes) -> list[list[dict]]:
    """Each image's automatic masks as mask_ar reads them: ranked by predicted IoU."""
    return [
        [{"segmentation": r["segmentation"], "score": r["predicted_iou"]} for r in records]
        for records in (generate_masks(segmenter, scenes.load(i), AUTO) for i in range(len(scenes)))
    ]


def test_cli_auto_recall_equals_mask_ar_on_the_same_automatic_masks(cli, tiny):
    command = ("evaluate", "segmentation", "cvfm/tiny-sam", "--data", "builtin:animal-scenes", "--limit", "2")
    rec = one_json_line(cli(*command, "--prompts", "auto", *AUTO_KNOBS, "--box-nms-thresh", "1"))
    scenes = subset(open_masks("builtin:animal-scenes", split="test"), range(2))
    proposals = _proposals(tiny, scenes)
    expected = mask_ar([it.target["masks"] for it in scenes.items], proposals)
    assert rec["metrics"] == pytest.approx({**expected, "auto_masks_per_image": 48.0}, abs=1e-12)
    assert 0 <= rec["metrics"]["ar@10"] <= rec["metrics"]["ar@100"] <= rec["metrics"]["ar@1000"] <= 1
    assert rec["protocol"]["prompts"] == ["auto"] and rec["protocol"]["auto"]["points_per_side"] == 4
    assert rec["data"]["instances"] == sum(len(it.target["masks"]) for it in scenes.items) > 0


def test_auto_recall_is_one_when_the_ground_truth_is_among_the_proposals(cli, tiny, tmp_path):
    """Ground truth made of two of each image's own automatic masks (the most and the least confident
    non-empty ones): every object is one proposal exactly (IoU 1), and the most confident proposal is one."""
    scenes = subset(open_masks("builtin:animal-scenes", split="test"), range(2))
    proposals, items = _proposals(tiny, scenes), []
    for item, ranked in zip(scenes.items, proposals, strict=True):
        ranked = sorted((p for p in ranked if mask_utils.area(p["segmentation"])), key=lambda p: -p["score"])
        items.append(
            dataclasses.replace(
                item, target=rle_target([ranked[0]["segmentation"], ranked[-1]["segmentation"]])
            )
        )
    scenes.items = items
    folder = write_coco(scenes, tmp_path / "coco")
    command = ("evaluate", "segmentation", "cvfm/tiny-sam", "--data", folder / "annotations.json")
    rec = one_json_line(cli(*command, "--prompts", "auto", *AUTO_KNOBS, "--box-nms-thresh", "1"))
    expected = mask_ar([it.target["masks"] for it in items], proposals)
    assert rec["metrics"] == pytest.approx({**expected, "auto_masks_per_image": 48.0}, abs=1e-12)
    assert rec["data"]["instances"] == 4
    assert rec["metrics"]["ar@1000"] == 1.0  # 48 proposals an image, all within the 1000
    assert rec["metrics"]["ar@10"] >= 0.5  # the most confident proposal is an object, at every IoU threshold
