"""`cvfm segment text`: clip-rerank ranks SAM's automatic masks by an image-text model's similarity (computed
again here, from our own crops and the transformers CLIPModel), detector turns an open-vocabulary detector's
boxes into SAM masks (checked against the detector and SAM called directly). Tiny random models: structure
and exactness, not quality."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from clitools import assert_usage_error, one_json_line
from PIL import Image

from cvfm.data.instances import decode_mask
from cvfm.models.amg import AutoSettings, generate_masks
from cvfm.registry import create_detector, create_dual_encoder, create_segmenter

SIZES = {"a.png": (97, 64), "b.png": (50, 81)}  # (width, height): odd, non-square
TEXTS = ["a red giraffe", "a cat"]
# A random tiny-sam passes these (no NMS: many candidates to rank): the ranking, not the masks' quality.
SETTINGS = AutoSettings(points_per_side=3, pred_iou_thresh=0, stability_score_thresh=0, box_nms_thresh=1.0)
KNOBS = ["--points-per-side", "3", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]
KNOBS += ["--box-nms-thresh", "1", "--precision", "fp32"]
TEXT_ARGS = [arg for t in TEXTS for arg in ("--text", t)]
KEYS = ("segmentation", "area", "bbox", "predicted_iou", "stability_score")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread on the shared CPU only waits
    yield
    torch.set_num_threads(before)


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (w, h) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


def _records(r) -> list[dict]:
    assert r.code == 0, r.err
    return [json.loads(line) for line in r.lines]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """cvfm/tiny-clip saved (a random model: the command and this test must read the same weights)."""
    return create_dual_encoder("cvfm/tiny-clip").save(tmp_path_factory.mktemp("clip") / "tiny-clip")


def _clip_scores(folder, image: Image.Image, masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(T, N) cosine similarities and softmax over masks, computed here: each mask's box with the pixels
    outside the mask grey (the preprocessing's mean), padded square, through transformers' CLIPModel."""
    from transformers import AutoTokenizer, CLIPModel

    preprocess = create_dual_encoder(str(folder)).preprocess
    fill = np.round(255 * np.array(preprocess.mean)).astype(np.uint8)
    crops = []
    for mask in masks:
        ys, xs = np.nonzero(mask)
        box = np.asarray(image)[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].copy()
        box[~mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]] = fill
        side = max(box.shape[:2])
        square = np.tile(fill, (side, side, 1))
        top, left = (side - box.shape[0]) // 2, (side - box.shape[1]) // 2
        square[top : top + box.shape[0], left : left + box.shape[1]] = box
        crops.append(preprocess.transform()(Image.fromarray(square)))
    model, tokenizer = CLIPModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        images = model.get_image_features(pixel_values=torch.stack(crops)).pooler_output
        texts = model.get_text_features(**tokenizer(TEXTS, padding=True, return_tensors="pt")).pooler_output
        cosine = torch.nn.functional.cosine_similarity(texts[:, None], images[None], dim=-1)
        probability = (model.logit_scale.exp() * cosine).softmax(dim=1)
    return cosine.numpy(), probability.numpy()


def test_clip_rerank_ranks_the_automatic_masks_by_clip_similarity(cli, photos, clip_folder):
    def run(*extra) -> list[dict]:
        args = ("segment", "text", "cvfm/tiny-sam", "--data", photos, "--clip", clip_folder, *TEXT_ARGS)
        return _records(cli(*args, *KNOBS, *extra))

    every, best = run("--threshold", "-1"), run()
    assert [(r["id"], r["text"]) for r in every] == [(n, t) for n in SIZES for t in TEXTS]
    sam = create_segmenter("cvfm/tiny-sam")
    for k, record in enumerate(every):
        image = Image.open(photos / record["id"]).convert("RGB")
        generated = generate_masks(sam, image, SETTINGS)
        masks = [decode_mask(g["segmentation"]) for g in generated]
        cosine, probability = _clip_scores(clip_folder, image, masks)
        t = TEXTS.index(record["text"])
        assert len(generated) > 5 and len(record["masks"]) == len(generated)  # --threshold -1 keeps all
        scores = [m["score"] for m in record["masks"]]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores, np.sort(cosine[t])[::-1], atol=1e-5)
        for m in record["masks"]:
            j = next(j for j, g in enumerate(generated) if g["segmentation"] == m["segmentation"])
            assert m["score"] == pytest.approx(cosine[t, j], abs=1e-5)
            assert m["probability"] == pytest.approx(probability[t, j], abs=1e-5)
            assert {key: m[key] for key in KEYS} == {key: generated[j][key] for key in KEYS}
        assert sum(m["probability"] for m in record["masks"]) == pytest.approx(1.0, abs=1e-5)
        assert best[k]["masks"] == record["masks"][:1]  # the default: the most similar mask alone
    # --threshold keeps the masks at least that similar; --top-k caps them
    cut = float(np.median([m["score"] for m in every[0]["masks"]]))
    kept = run("--threshold", str(cut), "--top-k", "100")[0]["masks"]
    assert kept == [m for m in every[0]["masks"] if m["score"] >= cut] and 0 < len(kept) < len(
        every[0]["masks"]
    )
    assert [r["masks"] for r in run("--top-k", "3")] == [r["masks"][:3] for r in every]


def test_detector_boxes_become_sam_masks_in_folders_and_a_rerun_skips_them(cli, photos, tmp_path):
    out = tmp_path / "masks"
    args = ("segment", "text", "cvfm/tiny-sam", "--data", photos, *TEXT_ARGS, "--strategy", "detector")
    args += ("--box-threshold", "0.55", "--top-k", "3", "--precision", "fp32", "-o", out)
    summary = one_json_line(cli(*args))
    assert (summary["images"], summary["already_done"], summary["guide"]) == (2, 0, "cvfm/tiny-owlv2")
    sam, owl = create_segmenter("cvfm/tiny-sam"), create_detector("cvfm/tiny-owlv2")
    total = outside = changed = 0
    for name, (w, h) in SIZES.items():
        folder = next(out.glob(f"{name}-*"))
        records = [json.loads(line) for line in (folder / "masks.jsonl").read_text().splitlines()]
        assert [r["text"] for r in records] == TEXTS and Image.open(folder / "overlay.png").size == (w, h)
        image = Image.open(photos / name).convert("RGB")
        found = owl.detect(image, TEXTS, 0.55)
        with torch.no_grad():
            embedding = sam.embed_image(sam.preprocess.transform()(image)[None], [(h, w)])
        clipped = found.boxes.clamp(min=0).minimum(torch.tensor([w, h, w, h]))
        inside = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        outside += int((~inside).sum())
        for k, record in enumerate(records):
            mine = torch.nonzero((found.labels == k) & inside).flatten()[:3]
            boxes = clipped[mine]
            changed += int((boxes != found.boxes[mine]).any(dim=1).sum())
            assert [m["score"] for m in record["masks"]] == pytest.approx(found.scores[mine].tolist())
            np.testing.assert_allclose([m["box"] for m in record["masks"]], boxes.reshape(-1, 4), atol=1e-5)
            with torch.no_grad():
                pred = sam.decode(embedding, boxes=boxes, multimask=False) if len(boxes) else None
            for j, m in enumerate(record["masks"]):
                expected = (sam.upscale(pred.low_res_logits, embedding)[j, 0] > 0).numpy()
                assert np.array_equal(decode_mask(m["segmentation"]), expected)
                assert np.array_equal(np.asarray(Image.open(folder / f"prompt{k}_mask{j}.png")) > 0, expected)
                assert m["predicted_iou"] == pytest.approx(float(pred.iou[j, 0]))
            total += len(record["masks"])
    assert summary["masks"] == total > 0
    assert outside > 0 and changed > 0  # boxes wholly in OWLv2's padding dropped, others clipped
    again = one_json_line(cli(*args))
    assert (again["images"], again["already_done"]) == (0, 2)


def test_usage_errors(cli, photos, tmp_path):
    base = ("segment", "text", "cvfm/tiny-sam", "--data", photos)
    assert_usage_error(cli(*base, "--text", " "), "give the text to segment")
    assert_usage_error(cli(*base, "--text", "a cat", "--strategy", "sam3"), "--strategy must be one of")
    assert_usage_error(
        cli(*base, "--text", "a cat", "--strategy", "detector", "--threshold", "0.2"), "--box-threshold"
    )
    assert_usage_error(cli(*base, "--text", "a cat", "--box-threshold", "0.2"), "--strategy detector")
    assert_usage_error(cli(*base, "--text", "a cat", "--clip", "cvfm/tiny-sam"), "not an image-text model")
    (tmp_path / "file").write_text("")
    assert_usage_error(cli(*base, "--text", "a cat", "-o", tmp_path / "file"), "is a file")
