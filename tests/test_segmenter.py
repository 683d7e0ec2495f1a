"""The segmenter face (SAM, SAM-HQ): equal to calling the transformers model through its own processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cvfm.data.preprocess import from_transformers
from cvfm.errors import CvfmError, UsageError
from cvfm.models.segmenter import Segmenter
from cvfm.models.tiny_sam import PREPROCESS, SIZE
from cvfm.registry import create_segmenter

TOL = 1e-5


def _processor():
    from transformers import SamImageProcessor, SamProcessor

    return SamProcessor(
        image_processor=SamImageProcessor(
            size={"longest_edge": SIZE}, pad_size={"height": SIZE, "width": SIZE}
        )
    )


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny():
    return create_segmenter("cvfm/tiny-sam")


# (width, height): odd, non-square, larger and smaller than the 128 px input
SIZES = [(203, 130), (51, 77), (128, 128)]


@pytest.mark.parametrize(("w", "h"), SIZES)
def test_preprocessing_is_sam_processors(tiny, w, h):
    proc = _processor()
    assert from_transformers(proc.image_processor) == PREPROCESS == tiny.preprocess
    photo = _photo(w, h)
    ours = tiny.preprocess.transform()(photo)
    theirs = proc(images=photo, return_tensors="pt")
    assert torch.equal(ours, theirs["pixel_values"][0])
    assert tiny.input_shape((h, w)) == tuple(theirs["reshaped_input_sizes"][0].tolist())


PROMPTS = {
    "one click, multimask": dict(points=[[[40.0, 30.0]]], labels=[[1]], multimask=True),
    "clicks with a negative, single": dict(
        points=[[[40.0, 30.0], [10.5, 60.25]]], labels=[[1, 0]], multimask=False
    ),
    "three prompts": dict(points=[[[5.0, 5.0]], [[100.0, 70.0]], [[50.0, 20.0]]], labels=[[1], [1], [1]]),
    "box": dict(boxes=[[12.0, 8.0, 150.0, 111.0]], multimask=False),
    "box and click": dict(boxes=[[12.0, 8.0, 150.0, 111.0]], points=[[[60.0, 40.0]]], labels=[[1]]),
}


@pytest.mark.parametrize("case", list(PROMPTS))
@pytest.mark.parametrize(("w", "h"), SIZES[:2])
def test_masks_and_scores_equal_the_transformers_model(tiny, case, w, h):
    p = PROMPTS[case]
    multimask = p.get("multimask", True)
    photo, proc = _photo(w, h, seed=1), _processor()
    kwargs = {}
    if "points" in p:
        kwargs.update(input_points=[p["points"]], input_labels=[p["labels"]])
    if "boxes" in p:
        kwargs.update(input_boxes=[p["boxes"]])
    inputs = proc(images=photo, return_tensors="pt", **kwargs)
    with torch.no_grad():
        ref = tiny.model(**inputs, multimask_output=multimask)
        masks_ref = proc.post_process_masks(
            ref.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False
        )[0]

        emb = tiny.embed_image(tiny.preprocess.transform()(photo)[None], [(h, w)])
        pred = tiny.decode(
            emb,
            points=torch.tensor(p["points"]) if "points" in p else None,
            labels=torch.tensor(p["labels"]) if "labels" in p else None,
            boxes=torch.tensor(p["boxes"]) if "boxes" in p else None,
            multimask=multimask,
        )
        logits = tiny.upscale(pred.low_res_logits, emb)
    assert pred.low_res_logits.shape == ref.pred_masks[0].shape
    assert pred.iou.shape == ref.iou_scores[0].shape == (masks_ref.shape[0], 3 if multimask else 1)
    torch.testing.assert_close(pred.iou, ref.iou_scores[0], rtol=0, atol=TOL)
    torch.testing.assert_close(pred.low_res_logits, ref.pred_masks[0], rtol=0, atol=TOL)
    assert logits.shape[-2:] == (h, w)
    torch.testing.assert_close(logits, masks_ref, rtol=0, atol=TOL)
    clear = masks_ref.abs() > 1e-4  # the masks agree wherever a logit is not within rounding of 0
    assert torch.equal((logits > 0)[clear], (masks_ref > 0)[clear])


def test_a_mask_prompt_feeds_the_previous_logits_back(tiny):
    photo, proc = _photo(203, 130, seed=2), _processor()
    with torch.no_grad():
        emb = tiny.embed_image(tiny.preprocess.transform()(photo)[None], [(130, 203)])
        first = tiny.decode(emb, points=torch.tensor([[[40.0, 30.0]]]), multimask=True)
        best = first.low_res_logits[0, first.iou[0].argmax()][None]
        again = tiny.decode(emb, points=torch.tensor([[[40.0, 30.0]]]), mask_input=best, multimask=False)
        inputs = proc(images=photo, input_points=[[[[40.0, 30.0]]]], return_tensors="pt")
        ref = tiny.model(
            image_embeddings=emb.features,
            input_points=inputs["input_points"],
            input_labels=torch.ones(1, 1, 1, dtype=torch.long),
            input_masks=best[None],
            multimask_output=False,
        )
    torch.testing.assert_close(again.low_res_logits, ref.pred_masks[0], rtol=0, atol=TOL)
    torch.testing.assert_close(again.iou, ref.iou_scores[0], rtol=0, atol=TOL)
    assert not torch.allclose(again.low_res_logits[0, 0], first.low_res_logits[0, first.iou[0].argmax()])


def test_saved_segmenter_loads_back_with_the_same_outputs(tiny, tmp_path):
    folder = tiny.save(tmp_path / "sam")
    assert (folder / "model.safetensors").exists()
    again = create_segmenter(str(folder))
    assert again.preprocess == tiny.preprocess
    pixels = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = (
            tiny.embed_image(pixels, [(90, 128), (128, 60)]),
            again.embed_image(pixels, [(90, 128), (128, 60)]),
        )
        assert torch.equal(a.features, b.features)
        pa = tiny.decode(a.select(1), boxes=torch.tensor([[3.0, 4.0, 50.0, 100.0]]))
        pb = again.decode(b.select(1), boxes=torch.tensor([[3.0, 4.0, 50.0, 100.0]]))
    assert torch.equal(pa.low_res_logits, pb.low_res_logits) and torch.equal(pa.iou, pb.iou)


def test_sam_hq_through_the_same_face():
    from transformers import SamHQConfig, SamHQModel

    from cvfm.models.tiny_sam import tiny_sam_config

    base = tiny_sam_config().to_dict()
    vision = {**base["vision_config"], "global_attn_indexes": [1]}
    decoder = {**base["mask_decoder_config"], "vit_dim": vision["hidden_size"]}
    torch.manual_seed(0)
    model = SamHQModel(
        SamHQConfig(
            vision_config=vision,
            prompt_encoder_config=base["prompt_encoder_config"],
            mask_decoder_config=decoder,
        )
    ).eval()
    hq = Segmenter(model, "tiny-sam-hq", PREPROCESS)
    photo, proc = _photo(51, 77, seed=3), _processor()
    inputs = proc(images=photo, input_points=[[[[20.0, 30.0]]]], return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs, multimask_output=True)
        emb = hq.embed_image(hq.preprocess.transform()(photo)[None], [(77, 51)])
        pred = hq.decode(emb, points=torch.tensor([[[20.0, 30.0]]]))
    torch.testing.assert_close(pred.low_res_logits, ref.pred_masks[0], rtol=0, atol=TOL)
    torch.testing.assert_close(pred.iou, ref.iou_scores[0], rtol=0, atol=TOL)


def test_clear_errors(tiny):
    emb = tiny.embed_image(torch.randn(2, 3, SIZE, SIZE), [(128, 128), (64, 128)])
    with pytest.raises(CvfmError, match="one image"):
        tiny.decode(emb, points=torch.tensor([[[1.0, 1.0]]]))
    with pytest.raises(CvfmError, match="at least one prompt"):
        tiny.decode(emb.select(0))
    with pytest.raises(CvfmError, match=r"points must be \(P, N, 2\)"):
        tiny.decode(emb.select(0), points=torch.tensor([[1.0, 1.0]]))
    with pytest.raises(UsageError, match="not a segmenter"):
        create_segmenter("cvfm/tiny-resnet")


def _sam2_processor():
    from transformers import Sam2ImageProcessor, Sam2Processor

    return Sam2Processor(image_processor=Sam2ImageProcessor(size={"height": SIZE, "width": SIZE}))


@pytest.fixture(scope="module")
def tiny2():
    return create_segmenter("cvfm/tiny-sam2")


@pytest.mark.parametrize(("w", "h"), SIZES[:2])
def test_sam2_preprocessing_is_sam2_processors(tiny2, w, h):
    proc = _sam2_processor()
    assert from_transformers(proc.image_processor) == tiny2.preprocess
    photo = _photo(w, h, seed=4)
    assert torch.equal(
        tiny2.preprocess.transform()(photo), proc(images=photo, return_tensors="pt")["pixel_values"][0]
    )


@pytest.mark.parametrize("case", list(PROMPTS))
def test_sam2_masks_and_scores_equal_the_transformers_model(tiny2, case):
    p, (w, h) = PROMPTS[case], SIZES[0]
    multimask = p.get("multimask", True)
    photo, proc = _photo(w, h, seed=5), _sam2_processor()
    kwargs = {}
    if "points" in p:
        kwargs.update(input_points=[p["points"]], input_labels=[p["labels"]])
    if "boxes" in p:
        kwargs.update(input_boxes=[p["boxes"]])
    inputs = proc(images=photo, return_tensors="pt", **kwargs)
    with torch.no_grad():
        ref = tiny2.model(**inputs, multimask_output=multimask)
        masks_ref = proc.post_process_masks(ref.pred_masks, inputs["original_sizes"], binarize=False)[0]
        emb = tiny2.embed_image(tiny2.preprocess.transform()(photo)[None], [(h, w)])
        pred = tiny2.decode(
            emb,
            points=torch.tensor(p["points"]) if "points" in p else None,
            labels=torch.tensor(p["labels"]) if "labels" in p else None,
            boxes=torch.tensor(p["boxes"]) if "boxes" in p else None,
            multimask=multimask,
        )
        logits = tiny2.upscale(pred.low_res_logits, emb)
    torch.testing.assert_close(pred.iou, ref.iou_scores[0], rtol=0, atol=TOL)
    torch.testing.assert_close(pred.low_res_logits, ref.pred_masks[0], rtol=0, atol=TOL)
    torch.testing.assert_close(logits, masks_ref, rtol=0, atol=TOL)
    assert ref.pred_masks.abs().max() > 100 * TOL
