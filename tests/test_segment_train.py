"""`cvfm segment train`: SAM's interactive training recipe (prompt simulation, losses), the run it writes and
loads from, and pseudo-labels from `cvfm segment auto` (the kill-and-resume test is in test_resume.py)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import assert_usage_error, one_json_line
from PIL import Image
from safetensors.torch import load_file

from cvfm.data.coco import write_coco
from cvfm.data.digest import compare, digest_items
from cvfm.data.instances import decode_mask, mask_target
from cvfm.data.masks_source import open_masks
from cvfm.data.sources import open_source, subset
from cvfm.errors import UsageError
from cvfm.eval.seg_run import evaluate_segmentation
from cvfm.models.amg import AutoSettings
from cvfm.registry import create_segmenter
from cvfm.segment.auto_run import segment_auto
from cvfm.segment.losses import LossWeights, dice_loss, focal_loss, prompt_loss
from cvfm.segment.pseudo import open_pseudo
from cvfm.segment.simulate import NOT_A_POINT, corrective_clicks, noisy_boxes, sample_points, valid_area
from cvfm.segment.train import SegmentTrainConfig, segment_train

SCENES = "builtin:animal-scenes"
# Many masks of a random tiny-sam, their predicted IoU and stability spread out (no NMS): filters to test.
AUTO = AutoSettings(
    points_per_side=4,
    pred_iou_thresh=0,
    stability_score_thresh=0.1,
    stability_score_offset=0.01,
    box_nms_thresh=1.0,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread (the runs below choose it too: one decoding worker on two cores), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def scenes_coco(tmp_path_factory) -> Path:
    """16 images of builtin:animal-scenes (128x96, 2 to 5 animals each) as a COCO instances file."""
    folder = tmp_path_factory.mktemp("coco") / "scenes"
    write_coco(subset(open_masks(SCENES, split="test"), range(16)), folder)
    return folder / "annotations.json"


# ------------------------------------------------------------------------------------ prompt simulation


def _masks() -> torch.Tensor:
    masks = torch.zeros(3, 32, 32, dtype=torch.bool)
    masks[0, 4:10, 5:20] = True  # a 6 x 15 rectangle
    masks[1, 20, 7] = True  # one pixel
    masks[2, 12:30, 12:14] = masks[2, 12:14, 12:30] = True  # an L
    return masks


def test_first_points_are_drawn_uniformly_from_their_masks():
    masks = _masks()
    torch.manual_seed(0)
    hits = torch.zeros(32, 32)
    for _ in range(300):
        xy, found = sample_points(masks)
        assert found.all() and torch.equal(xy, xy.round())
        cols, rows = xy[:, 0].long(), xy[:, 1].long()
        assert masks[torch.arange(3), rows, cols].all()  # x is the column, y the row
        hits[rows[0], cols[0]] += 1
    assert xy[1].tolist() == [7.0, 20.0]
    # 300 uniform draws from the rectangle's 90 pixels: ~87 distinct ones expected, none drawn 12 times
    assert (hits > 0).sum() >= 78 and hits.max() <= 12 and hits[~masks[0]].sum() == 0
    xy, found = sample_points(torch.zeros(1, 4, 4, dtype=torch.bool))
    assert not found[0] and xy.tolist() == [[0.0, 0.0]]


def test_boxes_are_the_tight_boxes_with_sams_noise():
    """Each coordinate moves by N(0, (10% of the side)^2), at most 20 px, and stays in the image part."""
    masks = torch.zeros(2, 128, 128, dtype=torch.bool)
    masks[0, 10:60, 20:120] = True  # 100 wide, 50 tall: std 10 in x (capped at 20), 5 in y
    masks[1, 100:110, 30:40] = True  # 10 x 10: std 1
    shapes = [(96, 128), (112, 128)]
    rng = np.random.default_rng(0)
    boxes = torch.stack([noisy_boxes(masks, shapes, rng) for _ in range(400)])  # (400, 2, 4)
    tight = torch.tensor([[20, 10, 119, 59], [30, 100, 39, 109]], dtype=torch.float32)
    delta = boxes - tight
    assert delta.abs().max() <= 20 + 1e-4 and delta[:, 0, 0].abs().max() > 15  # capped, yet it does move
    assert 8.5 < float(delta[:, 0, 0].std()) < 10.5  # x0 of a 100 px side: 10, less the capped tails
    assert 4.3 < float(delta[:, 0, 1].std()) < 5.7  # y0 of a 50 px side
    assert 0.85 < float(delta[:, 1, :2].std()) < 1.15  # a 10 px side
    assert (boxes[..., 0] <= boxes[..., 2]).all() and (boxes[..., 1] <= boxes[..., 3]).all()
    assert (boxes[:, 0, :] >= 0).all() and (boxes[:, 0, [1, 3]] <= 95).all()  # inside the 96 rows
    assert (boxes[:, 0, [0, 2]] <= 127).all() and (boxes[:, 0, 2] == 127).any()  # kept in, by clipping


def test_corrective_clicks_are_drawn_from_the_error_region_with_its_label():
    gt = torch.zeros(5, 16, 16, dtype=torch.bool)
    gt[:, 4:12, 4:12] = True
    pred = gt.clone()
    pred[0, 4:12, 4:8] = False  # missed: only false negatives
    pred[1, 0:3, :] = True  # spilled: only false positives
    # pred[2] is perfect
    pred[3, 13:16, :] = True  # spilled into the padding only (rows 12+ are not the image): nothing to fix
    pred[4, 4:5, 4:8] = False  # 4 pixels missed ...
    pred[4, 0:1, 0:12] = True  # ... and 12 spilled
    valid = valid_area([(16, 16)] * 3 + [(12, 16), (16, 16)], 16, "cpu")
    torch.manual_seed(0)
    positives = 0
    for _ in range(400):
        xy, labels = corrective_clicks(gt, pred, valid)
        cols, rows = xy[:, 0].long(), xy[:, 1].long()
        assert labels[0] == 1 and (gt[0] & ~pred[0])[rows[0], cols[0]]
        assert labels[1] == 0 and (pred[1] & ~gt[1])[rows[1], cols[1]]
        assert labels[2] == labels[3] == NOT_A_POINT
        error = gt[4] ^ pred[4]
        assert error[rows[4], cols[4]] and labels[4] == int(gt[4, rows[4], cols[4]])
        positives += int(labels[4])
    assert 0.17 < positives / 400 < 0.33  # uniform over the error: 4 of its 16 pixels are positive


# ---------------------------------------------------------------------------------------------- losses


def _focal_by_hand(logits: list[float], target: list[int]) -> float:
    alpha, total = 0.25, 0.0
    for x, t in zip(logits, target, strict=True):
        p = 1 / (1 + math.exp(-x))
        total += -alpha * (1 - p) ** 2 * math.log(p) if t else -(1 - alpha) * p**2 * math.log(1 - p)
    return total / len(logits)


def _dice_by_hand(logits: list[float], target: list[int]) -> float:
    p = [1 / (1 + math.exp(-x)) for x in logits]
    inter = sum(pi * t for pi, t in zip(p, target, strict=True))
    return 1 - (2 * inter + 1) / (sum(p) + sum(target) + 1)


def test_losses_equal_the_formulas_and_only_the_best_candidate_learns():
    bad, good = [2.0, -1.0, 0.5, -3.0], [4.0, -5.0, -4.0, -6.0]
    target = [1, 0, 0, 0]
    logits = torch.tensor([[bad, good]], dtype=torch.float64).reshape(1, 2, 2, 2).requires_grad_()
    mask = torch.tensor(target, dtype=torch.bool).reshape(1, 2, 2)
    twice = mask[:, None].expand(1, 2, 2, 2)
    assert float(focal_loss(logits, twice)[0, 0].detach()) == pytest.approx(_focal_by_hand(bad, target))
    assert float(dice_loss(logits, twice)[0, 1].detach()) == pytest.approx(_dice_by_hand(good, target))

    iou_pred = torch.tensor(
        [[0.9, 0.8]], dtype=torch.float64, requires_grad=True
    )  # the bad candidate is the more confident
    loss, parts = prompt_loss(logits, iou_pred, mask, LossWeights())
    # true IoUs: bad predicts pixels 0 and 2 (IoU 1/2), good pixel 0 (IoU 1)
    mse = ((0.9 - 0.5) ** 2 + (0.8 - 1.0) ** 2) / 2
    expected = 20 * _focal_by_hand(good, target) + _dice_by_hand(good, target) + mse
    assert float(loss[0].detach()) == pytest.approx(expected)
    assert float(parts["iou"][0]) == 0.5  # the candidate a user gets: highest predicted IoU
    assert float(parts["iou_mse"][0].detach()) == pytest.approx(mse)
    loss.sum().backward()
    assert torch.count_nonzero(logits.grad[0, 0]) == 0 and torch.count_nonzero(logits.grad[0, 1]) == 4
    assert torch.count_nonzero(iou_pred.grad) == 2  # the IoU head learns on every candidate


# ------------------------------------------------------------------------------------ the segmenter face


@pytest.fixture(scope="module")
def tiny():
    return create_segmenter("cvfm/tiny-sam")


def test_decode_batch_equals_decode_per_prompt(tiny):
    """Prompts on the batch axis, each with its own mask, as `decode` gives them one at a time."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 256, (81, 50, 3), dtype=np.uint8))  # odd, portrait
    with torch.no_grad():
        emb = tiny.embed_image(tiny.preprocess.transform()(photo)[None], [(81, 50)])
        points = torch.tensor([[[10.0, 20.0], [30.0, 60.0]], [[40.0, 5.0], [12.0, 70.0]]])
        labels = torch.tensor([[1, 0], [1, 1]])
        boxes = torch.tensor([[5.0, 10.0, 30.0, 50.0], [20.0, 40.0, 45.0, 78.0]])
        masks = torch.randn(2, 64, 64)
        one = [
            tiny.decode(emb, points[i : i + 1], labels[i : i + 1], boxes[i : i + 1], masks[i : i + 1])
            for i in (0, 1)
        ]
        corners = tiny.to_input(boxes.reshape(2, 2, 2), (81, 50)).reshape(2, 4).float()
        both = tiny.decode_batch(
            emb.features.expand(2, -1, -1, -1),
            tiny.to_input(points, (81, 50)).float(),
            labels,
            corners,
            masks,
        )
    for i in (0, 1):
        torch.testing.assert_close(both.low_res_logits[i], one[i].low_res_logits[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(both.iou[i], one[i].iou[0], rtol=0, atol=1e-5)


def test_sam2_decode_batch_takes_rows_of_every_feature_level():
    """SAM 2's embedding is a list of levels: `rows` picks one row of each per prompt, and decoding them on
    the batch axis equals decoding each image's prompt alone."""
    sam2 = create_segmenter("cvfm/tiny-sam2")
    rng = np.random.default_rng(2)
    photos = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((81, 50), (60, 97))
    ]
    sizes = [(81, 50), (60, 97)]
    with torch.no_grad():
        emb = sam2.embed_image(torch.stack([sam2.preprocess.transform()(p) for p in photos]), sizes)
        owner = [1, 0, 1]  # prompts of image 1, 0, 1
        picked = emb.rows(owner)
        assert [t.shape[0] for t in picked.features] == [3] * len(emb.features)
        assert picked.original_sizes == [sizes[1], sizes[0], sizes[1]]
        points = torch.tensor([[[30.0, 20.0]], [[10.0, 40.0]], [[80.0, 50.0]]])
        batch = sam2.decode_batch(
            picked.features,
            torch.stack([sam2.to_input(points[i], sizes[o]) for i, o in enumerate(owner)]).float(),
            torch.ones(3, 1, dtype=torch.long),
        )
        for i, o in enumerate(owner):
            alone = sam2.decode(emb.select(o), points[i : i + 1])
            torch.testing.assert_close(batch.low_res_logits[i], alone.low_res_logits[0], rtol=0, atol=1e-5)
            torch.testing.assert_close(batch.iou[i], alone.iou[0], rtol=0, atol=1e-5)


def test_sam2_trains_and_loads_back(scenes_coco, tmp_path):
    """`segment train` on a SAM 2 (its embedding a list of feature levels): the decoder learns, the frozen
    Hiera encoder does not change, and the run loads as a SAM 2 segmenter."""
    cfg = SegmentTrainConfig(
        data=str(scenes_coco),
        output=str(tmp_path / "run"),
        model="cvfm/tiny-sam2",
        epochs=2,
        batch_size=4,
        lr=3e-3,
        num_workers=1,
        options={"clicks": "1", "refine": "1"},
    )
    run = segment_train(cfg)
    epochs = _epochs(run)
    assert len(epochs) == 2 and epochs[-1]["epoch/loss"] < epochs[0]["epoch/loss"]
    loaded = create_segmenter(str(run))
    start, now = create_segmenter("cvfm/tiny-sam2").model.state_dict(), loaded.model.state_dict()
    assert loaded.family == "sam2" and start.keys() == now.keys()
    assert all(torch.equal(start[k], now[k]) for k in now if k.startswith("vision_encoder."))
    decoder = [k for k in now if k.startswith("mask_decoder.")]
    assert sum(not torch.equal(start[k], now[k]) for k in decoder) > 0.9 * len(decoder)


def test_masks_move_into_the_input_frame_as_the_image_does(tiny):
    """A mask drawn as an image goes through the model's preprocessing onto `input_masks`' pixels."""
    rng = np.random.default_rng(1)
    mask = np.zeros((81, 50), dtype=bool)
    mask[10:60, 5:30] = True
    mask[rng.random((81, 50)) < 0.05] = True  # speckles test the rounding
    moved = tiny.input_masks(torch.from_numpy(mask)[None], (81, 50))[0]
    assert moved.shape == (128, 128) and tiny.input_shape((81, 50)) == (128, 79)
    assert not moved[:, 79:].any()  # the padding
    picture = Image.fromarray(np.repeat(mask[..., None] * np.uint8(255), 3, axis=2))
    pixels = tiny.preprocess.transform()(picture)[0] * tiny.preprocess.std[0] + tiny.preprocess.mean[0]
    assert float((moved == (pixels >= 0.5)).float().mean()) > 0.995


# ----------------------------------------------------------------------------------- a run, end to end


@pytest.fixture(scope="module")
def trained(scenes_coco, tmp_path_factory) -> Path:
    """tiny-sam fine-tuned on the 16 images: 4 epochs of 4 steps."""
    cfg = SegmentTrainConfig(
        data=str(scenes_coco),
        output=str(tmp_path_factory.mktemp("train") / "run"),
        model="cvfm/tiny-sam",
        epochs=4,
        batch_size=4,
        lr=3e-3,
        num_workers=1,
    )
    run = segment_train(cfg)
    return run


def _epochs(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "epoch/loss" in r]


def test_training_lowers_the_loss(trained, scenes_coco):
    """On a random tiny-sam the first steps mostly unlearn its random false positives (focal loss, the
    IoU head's error); the loss of the last epoch is well below the first's."""
    epochs = _epochs(trained)
    assert len(epochs) == 4 and all(math.isfinite(r["epoch/loss"]) for r in epochs)
    assert epochs[-1]["epoch/loss"] < 0.6 * epochs[0]["epoch/loss"]
    assert epochs[-1]["epoch/focal"] < 0.5 * epochs[0]["epoch/focal"]
    assert epochs[-1]["epoch/iou_mse"] < 0.2 * epochs[0]["epoch/iou_mse"]
    run = json.loads((trained / "run.json").read_text())
    masks = sum(len(it.target["masks"]) for it in open_masks(str(scenes_coco)).items)
    assert run["status"] == "finished" and run["data"] == {
        "name": str(scenes_coco),
        "images": 16,
        "masks": masks,
    }
    assert run["resolved"]["iterations"] == 6 and run["method_config"]["clicks"] == 3


def test_the_run_loads_as_a_segmenter_with_new_decoder_and_the_same_encoder(
    trained, scenes_coco, tiny, unlabelled, cli, tmp_path
):
    segmenter = create_segmenter(str(trained))
    start, now = tiny.model.state_dict(), segmenter.model.state_dict()
    assert start.keys() == now.keys()
    frozen = [k for k in now if k.startswith("vision_encoder.")]
    learned = [k for k in now if k.startswith(("mask_decoder.", "prompt_encoder."))]
    assert frozen and all(torch.equal(start[k], now[k]) for k in frozen)
    changed = [k for k in learned if not torch.equal(start[k], now[k])]
    assert len(changed) > 0.9 * len(learned), sorted(set(learned) - set(changed))

    # the commands that take a segmenter take the run
    scores = evaluate_segmentation(str(trained), str(scenes_coco), prompts=("box",), limit=2, num_workers=1)
    assert scores["data"]["instances"] > 0 and 0 <= scores["metrics"]["box_miou"] <= 1
    r = cli("segment", "prompt", trained, "--data", unlabelled, "--point", "40,30", "--precision", "fp32")
    assert r.code == 0 and len(r.lines) == 4 and all(json.loads(line)["masks"] for line in r.lines)
    r = cli(
        "segment", "auto", trained, "--data", unlabelled, "--points-per-side", "2", "-o", tmp_path / "auto"
    )
    assert one_json_line(r)["images"] == 4 and len(list((tmp_path / "auto").rglob("metadata.csv"))) == 4


def test_train_encoder_trains_the_image_encoder_too(scenes_coco, tiny, tmp_path):
    cfg = SegmentTrainConfig(
        data=str(scenes_coco),
        output=str(tmp_path / "run"),
        model="cvfm/tiny-sam",
        epochs=1,
        num_workers=1,
        train_encoder=True,
        options={"clicks": "1", "refine": "0"},
    )
    weights = load_file(segment_train(cfg) / "backbone" / "model.safetensors")
    start = tiny.model.state_dict()
    encoder = [k for k in weights if k.startswith("vision_encoder.")]
    assert encoder and all(not torch.equal(weights[k], start[k]) for k in encoder if k.endswith(".weight"))


# --------------------------------------------------------------------------------------- pseudo-labels


@pytest.fixture(scope="module")
def unlabelled(tmp_path_factory) -> Path:
    """Four scenes as PNG files, one of them resized to an odd 77x58, in a sub-folder too."""
    folder = tmp_path_factory.mktemp("unlabelled") / "photos"
    (folder / "sub").mkdir(parents=True)
    source = open_source(SCENES, split="test")
    for i, name in enumerate(["a.png", "b.png", "sub/c.png", "d.jpg"]):
        image = source.load(100 + i)
        (image.resize((77, 58)) if name == "b.png" else image).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def auto_outputs(unlabelled, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("auto")
    for fmt in ("amg", "coco-rle", "coco"):
        segment_auto(
            "cvfm/tiny-sam", str(unlabelled), str(root / fmt), fmt=fmt, settings=AUTO, precision="fp32"
        )
    return {fmt: root / fmt for fmt in ("amg", "coco-rle", "coco")}


def _expected(coco_rle: Path, min_iou: float, min_stability: float) -> dict[str, list[np.ndarray]]:
    """The masks auto wrote (its coco-rle records) that pass the thresholds, by image id."""
    out = {}
    for file in sorted(coco_rle.rglob("*.json")):
        name = file.relative_to(coco_rle).with_suffix("").as_posix()
        records = json.loads(file.read_text())
        out[name] = [
            decode_mask(r["segmentation"])
            for r in records
            if (min_iou <= 0 or r["predicted_iou"] >= min_iou)
            and (min_stability <= 0 or r["stability_score"] >= min_stability)
        ]
    return out


def _found(source) -> dict[str, list[np.ndarray]]:
    return {
        Path(it.id.removeprefix("pseudo:")).with_suffix("").as_posix(): [
            decode_mask(m) for m in it.target["masks"]
        ]
        for it in source.items
    }


def test_pseudo_labels_are_the_auto_masks_that_pass_the_filters(auto_outputs, unlabelled):
    records = [r for f in auto_outputs["coco-rle"].rglob("*.json") for r in json.loads(f.read_text())]
    ious = sorted(r["predicted_iou"] for r in records)
    stabilities = sorted(r["stability_score"] for r in records)
    assert len(records) >= 100
    positive = [v for v in ious if v > 0]  # a random model's predicted IoU is mostly negative
    assert len(positive) >= 4
    min_iou, min_stability = positive[len(positive) // 2], stabilities[len(stabilities) // 2]
    expected = _expected(auto_outputs["coco-rle"], min_iou, min_stability)
    expected = {k: v for k, v in expected.items() if v}
    kept = sum(map(len, expected.values()))
    assert 0 < kept < len(records)
    for fmt in ("amg", "coco-rle"):
        source, record = open_pseudo(
            str(auto_outputs[fmt]), str(unlabelled), min_iou=min_iou, min_stability=min_stability
        )
        found = _found(source)
        assert found.keys() == expected.keys(), fmt
        for name in expected:
            assert len(found[name]) == len(expected[name])
            assert all(np.array_equal(a, b) for a, b in zip(found[name], expected[name], strict=True))
        assert record["masks_read"] == len(records) and record["masks"] == kept and record["format"] == fmt
        assert source.load(0).size == Image.open(source.items[0].ref).size
    coco, _ = open_pseudo(str(auto_outputs["coco"]), str(unlabelled), min_iou=min_iou)  # by "score"
    expected_iou = {k: v for k, v in _expected(auto_outputs["coco-rle"], min_iou, 0).items() if v}
    assert {k: len(v) for k, v in _found(coco).items()} == {k: len(v) for k, v in expected_iou.items()}


def test_pseudo_errors_are_clear(auto_outputs, unlabelled, tmp_path):
    with pytest.raises(UsageError, match="holds no stability scores"):
        open_pseudo(str(auto_outputs["coco"]), str(unlabelled), min_stability=0.9)
    other = tmp_path / "other"
    other.mkdir()
    Image.open(unlabelled / "a.png").save(other / "a.png")
    with pytest.raises(UsageError, match=r"3 image\(s\) of the auto output .* are not in"):
        open_pseudo(str(auto_outputs["amg"]), str(other))
    with pytest.raises(UsageError, match="holds no cvfm segment auto output"):
        open_pseudo(str(other), str(unlabelled))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "instances.partial.jsonl").write_text("")
    with pytest.raises(UsageError, match="unfinished cvfm segment auto run"):
        open_pseudo(str(tmp_path / "half"), str(unlabelled))


def test_train_with_pseudo_labels_adds_the_kept_masks(cli, scenes_coco, auto_outputs, unlabelled, tmp_path):
    """train -> auto-label -> retrain, through the CLI: the auto masks join the labelled data."""
    args = ["segment", "train", "--model", "cvfm/tiny-sam", "--data", scenes_coco, "--epochs", "1"]
    args += ["--batch-size", "8", "--num-workers", "1", "--opt", "clicks=1", "--opt", "refine=0"]
    pseudo = ["--pseudo", auto_outputs["amg"], "--pseudo-images", unlabelled, "--pseudo-min-stability", "0.6"]
    out = one_json_line(cli(*args, *pseudo, "-o", tmp_path / "run"))
    run = json.loads((Path(out["run"]) / "run.json").read_text())
    expected = {k: v for k, v in _expected(auto_outputs["coco-rle"], 0, 0.6).items() if v}
    assert run["data"]["pseudo"]["images"] == len(expected) > 0
    assert run["data"]["pseudo"]["masks"] == sum(map(len, expected.values()))
    ids = [
        json.loads(line)["id"] for line in (Path(out["run"]) / "data_items.jsonl").read_text().splitlines()
    ]
    assert len(ids) == 16 + len(expected)
    assert sorted(i for i in ids if i.startswith("pseudo:")) == sorted(
        f"pseudo:{k}" for k in _names(unlabelled, expected)
    )
    assert run["resolved"]["steps_per_epoch"] == (16 + len(expected)) // 8
    assert_usage_error(cli(*args, "--pseudo", auto_outputs["amg"], "-o", tmp_path / "r2"), "--pseudo-images")
    assert_usage_error(cli("segment", "train", "--data", scenes_coco, "-o", tmp_path / "r3"), "--model")
    assert_usage_error(cli(*args, "--opt", "clicks=-1", "-o", tmp_path / "r4"), "clicks")
    assert_usage_error(cli(*args, "--opt", "click=2", "-o", tmp_path / "r5"), "unknown option 'click'")
    assert_usage_error(cli(*args, "--pseudo-min-iou", "0.9", "-o", tmp_path / "r6"), "go with --pseudo")
    assert not any((tmp_path / f"r{i}").exists() for i in range(2, 7))  # refused before making anything


def _names(folder: Path, expected: dict) -> list[str]:
    files = {
        p.relative_to(folder).with_suffix("").as_posix(): p.relative_to(folder).as_posix()
        for p in folder.rglob("*.*")
    }
    return [files[k] for k in expected]


def test_the_data_digest_sees_changed_masks(scenes_coco):
    """A resumed run compares its data's digest with the one it started on: a mask edited in between counts
    as a change (the training targets are part of the data)."""
    source = open_masks(str(scenes_coco))
    before = digest_items(source)
    edited = subset(source, range(len(source)))
    first = edited.items[0]
    masks = [decode_mask(m) for m in first.target["masks"]]
    masks[0][0, 0] = not masks[0][0, 0]
    edited.items[0] = replace(first, target=mask_target(masks))
    changes = compare(before, digest_items(edited))
    assert changes and "1 changed" in changes.describe()
    assert not compare(before, digest_items(subset(source, range(len(source)))))
