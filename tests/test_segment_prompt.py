"""`cvfm segment prompt`: prompts from flags or a file, one embedding per image, the cache, the outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from clitools import assert_usage_error, one_json_line
from PIL import Image

from cvfm.data.instances import decode_mask
from cvfm.models.segmenter import Segmenter
from cvfm.registry import create_segmenter

SIZES = {"a.png": (203, 130), "b.jpg": (77, 51)}  # (width, height): odd, non-square


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # hundreds of tiny decodes: a second thread only waits (see test_segment_eval)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name, quality=95)
    return folder


def _records(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_one_click_gives_three_masks_equal_to_the_face(cli, photos):
    r = cli("segment", "prompt", "cvfm/tiny-sam", "--data", photos, "--point", "40,30", "--precision", "fp32")
    assert r.code == 0, r.err
    records = _records(r.out)
    assert [rec["id"] for rec in records] == ["a.png", "b.jpg"]
    sam = create_segmenter("cvfm/tiny-sam")
    for rec in records:
        w, h = SIZES[rec["id"]]
        assert rec["prompt"] == {"points": [[40.0, 30.0]], "labels": [1]}
        assert len(rec["masks"]) == 3  # SAM's rule: one point alone is ambiguous
        ious = [m["predicted_iou"] for m in rec["masks"]]
        assert ious == sorted(ious, reverse=True)
        image = Image.open(photos / rec["id"]).convert("RGB")
        with torch.no_grad():
            emb = sam.embed_image(sam.preprocess.transform()(image)[None], [(h, w)])
            pred = sam.decode(emb, points=torch.tensor([[[40.0, 30.0]]]))
            logits = sam.upscale(pred.low_res_logits, emb)[0]
        best = int(pred.iou[0].argmax())
        mask = decode_mask(rec["masks"][0]["segmentation"])
        assert mask.shape == (h, w)
        assert np.array_equal(mask, (logits[best] > 0).numpy())
        assert rec["masks"][0]["predicted_iou"] == pytest.approx(float(pred.iou[0, best]), abs=1e-6)
        assert rec["masks"][0]["area"] == int(mask.sum())
        x, y, bw, bh = rec["masks"][0]["bbox"]
        if mask.any():
            ys, xs = np.nonzero(mask)
            assert [x, y, bw, bh] == [xs.min(), ys.min(), xs.max() - xs.min(), ys.max() - ys.min()]


def test_a_prompts_file_from_excel_embeds_each_image_once(cli, photos, monkeypatch):
    lines = [
        {"image": "a.png", "points": [[40, 30], [100, 90]], "labels": [1, 0]},
        {"image": "a.png", "box": [10, 10, 150, 100]},
        {"image": "b.jpg", "points": [[20, 20]]},
    ]
    prompts = photos / "prompts.jsonl"
    prompts.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(x) + "\r\n" for x in lines).encode())
    calls = []
    original = Segmenter.embed_image
    monkeypatch.setattr(Segmenter, "embed_image", lambda self, *a: calls.append(1) or original(self, *a))
    records = _records(cli("segment", "prompt", "cvfm/tiny-sam", "--prompts", prompts).out)
    assert len(calls) == 2  # two images, three prompts
    assert [(r["id"], len(r["masks"])) for r in records] == [("a.png", 1), ("a.png", 1), ("b.jpg", 3)]
    assert records[1]["prompt"] == {"box": [10.0, 10.0, 150.0, 100.0]}
    single = _records(cli("segment", "prompt", "cvfm/tiny-sam", "--prompts", prompts, "--single").out)
    assert [len(r["masks"]) for r in single] == [1, 1, 1]


@pytest.mark.parametrize("model", ["cvfm/tiny-sam", "cvfm/tiny-sam2"])
def test_the_cache_skips_the_encoder_and_changes_nothing(cli, photos, monkeypatch, tmp_path, model):
    args = (
        "segment",
        "prompt",
        model,
        "--data",
        photos,
        "--box",
        "5,5,60,40",
        "--cache",
        tmp_path / "c",
    )
    first = cli(*args)
    assert len(list((tmp_path / "c").rglob("*.safetensors"))) == 2
    monkeypatch.setattr(Segmenter, "embed_image", lambda *a: pytest.fail("the encoder ran"))
    second = cli(*args)
    assert second.code == 0 and second.out == first.out
    assert "2 embedding(s) from the cache, 0 computed" in second.err


def test_folder_output_pngs_records_overlay_and_a_rerun_finishes_only_the_rest(cli, photos, tmp_path):
    (photos / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "masks"
    args = ("segment", "prompt", "cvfm/tiny-sam", "--data", photos, "--point", "30,20", "--point", "10,40,0")
    summary = one_json_line(cli(*args, "-o", out))
    assert summary["images"] == 2 and summary["masks"] == 2  # two points: one mask each
    assert [s["where"].endswith("broken.png") for s in summary["skipped"]] == [True]
    folders = sorted(p.name for p in out.iterdir())
    assert len(folders) == 2 and all(f.startswith(("a.png-", "b.jpg-")) for f in folders)
    a = out / folders[0]
    assert sorted(p.name for p in a.iterdir()) == ["masks.jsonl", "overlay.png", "prompt0_mask0.png"]
    png = np.asarray(Image.open(a / "prompt0_mask0.png"))
    record = json.loads((a / "masks.jsonl").read_text())
    assert set(np.unique(png)) <= {0, 255} and np.array_equal(
        png > 0, decode_mask(record["masks"][0]["segmentation"])
    )
    assert Image.open(a / "overlay.png").size == SIZES["a.png"]
    (photos / "c.png").write_bytes((photos / "a.png").read_bytes())
    again = one_json_line(cli(*args, "-o", out))
    assert (again["images"], again["already_done"]) == (1, 2)
    strict = cli(*args, "-o", tmp_path / "strict", "--strict")
    assert strict.code == 1 and "broken.png: cannot decode image" in strict.err  # a data error, as elsewhere


def test_usage_errors(cli, photos):
    base = ("segment", "prompt", "cvfm/tiny-sam", "--data", photos)
    assert_usage_error(cli(*base), "--point / --box", "--prompts")
    assert_usage_error(cli(*base, "--point", "3"), "--point takes x,y[,label]")
    assert_usage_error(cli(*base, "--point", "3,4,7"), "labels are 1")
    assert_usage_error(cli(*base, "--box", "9,9,1,1"), "x0 <= x1")
    assert_usage_error(
        cli(*base, "--point", "3,4", "--box", "1,1,5,5", "--box", "2,2,6,6"), "at most one --box"
    )
    bad = photos / "p.jsonl"
    bad.write_text('{"image": "zebra.png", "points": [[1, 2]]}\n')
    assert_usage_error(cli(*base[:3], "--data", photos, "--prompts", bad), "zebra.png")
    bad.write_text('{"image": "a.png", "points": [[1, 2]]}\n{oops\n')
    assert_usage_error(cli(*base[:3], "--prompts", bad), "p.jsonl:2")
