"""`cvfm segment auto`: the CLI over `generate_masks` and the writers (the kill-and-rerun test is in
test_resume.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from clitools import assert_usage_error, one_json_line
from PIL import Image
from pycocotools.coco import COCO

from cvfm.models.amg import AutoSettings, generate_masks
from cvfm.registry import create_segmenter

# Thresholds a random tiny-sam passes (its logits are ~1e-2): the records' structure, not their quality.
KNOBS = ["--points-per-side", "6", "--pred-iou-thresh", "0", "--stability-score-thresh", "0.5"]
KNOBS += ["--stability-score-offset", "0.05", "--precision", "fp32"]
SETTINGS = AutoSettings(
    points_per_side=6, pred_iou_thresh=0, stability_score_thresh=0.5, stability_score_offset=0.05
)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a.png": (97, 64), "sub/b.png": (50, 81)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_json_lines_equal_the_library(cli, photos):
    r = cli("segment", "auto", "cvfm/tiny-sam", "--data", photos, "-o", "-", *KNOBS)
    assert r.code == 0, r.err
    lines = [json.loads(x) for x in r.out.splitlines()]
    assert [x["id"] for x in lines] == ["a.png", "sub/b.png"]
    sam = create_segmenter("cvfm/tiny-sam")
    for line in lines:
        expected = generate_masks(sam, Image.open(photos / line["id"]), SETTINGS)
        assert len(expected) > 0 and json.loads(json.dumps(expected)) == line["masks"]


def test_folders_keep_sub_folders_skip_bad_images_and_draw_overlays(cli, photos, tmp_path):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = tmp_path / "amg"
    summary = one_json_line(
        cli("segment", "auto", "cvfm/tiny-sam", "--data", photos, "-o", out, "--overlays", *KNOBS)
    )
    assert (summary["images"], summary["already_done"], summary["format"]) == (2, 0, "amg")
    assert [s["where"].endswith("broken.jpg") for s in summary["skipped"]] == [True]
    assert (out / "a" / "metadata.csv").exists() and (out / "sub" / "b" / "metadata.csv").exists()
    assert Image.open(out / "overlays" / "sub" / "b.png").size == (50, 81)
    again = one_json_line(cli("segment", "auto", "cvfm/tiny-sam", "--data", photos, "-o", out, *KNOBS))
    assert (again["images"], again["already_done"]) == (0, 2)  # the broken one is tried again, and skipped
    strict = cli(
        "segment", "auto", "cvfm/tiny-sam", "--data", photos, "-o", tmp_path / "s", "--strict", *KNOBS
    )
    assert strict.code == 1 and "broken.jpg" in strict.err


def test_coco_output_loads_and_a_torn_partial_line_is_redone(cli, photos, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    args = ("segment", "auto", "cvfm/tiny-sam", "--data", photos, "--format", "coco", *KNOBS)
    one_json_line(cli(*args, "-o", full))
    coco = COCO(str(full / "instances.json"))
    assert [im["file_name"] for im in coco.dataset["images"]] == ["a.png", "sub/b.png"]
    assert len(coco.getAnnIds()) > 0 and not (full / "instances.partial.jsonl").exists()
    # A run killed while appending its second image: the first line whole, the second cut.
    records = generate_masks(create_segmenter("cvfm/tiny-sam"), Image.open(photos / "a.png"), SETTINGS)
    whole = json.dumps({"name": "a.png", "size": [64, 97], "records": records})
    cut = json.dumps({"name": "sub/b.png", "size": [81, 50], "records": []})[:25]
    part.mkdir()
    (part / "instances.partial.jsonl").write_text(whole + "\n" + cut)
    summary = one_json_line(cli(*args, "-o", part))
    assert (summary["images"], summary["already_done"]) == (1, 1)
    assert json.loads((part / "instances.json").read_text()) == json.loads(
        (full / "instances.json").read_text()
    )


def test_usage_errors(cli, photos, tmp_path):
    base = ("segment", "auto", "cvfm/tiny-sam", "--data", photos, "-o", tmp_path / "o")
    assert_usage_error(cli(*base, "--format", "png"), "--format must be one of amg, coco-rle, coco, yolo")
    assert_usage_error(cli(*base, "--pred-iou-thresh", "-1"), "pred_iou_thresh must not be negative")
    assert_usage_error(
        cli(*base, "--points-per-side", "2", "--crop-n-layers", "2", "--crop-n-points-downscale-factor", "4"),
        "leaves no points",
    )


def test_generator_options_default_to_the_reference_settings():
    from dataclasses import fields

    from cvfm.cli.common import AUTO_OPTIONS

    reference = {
        f.name: getattr(AutoSettings(), f.name) for f in fields(AutoSettings) if f.name != "mask_threshold"
    }
    assert {name: option.default for name, (_, option) in AUTO_OPTIONS.items()} == reference
