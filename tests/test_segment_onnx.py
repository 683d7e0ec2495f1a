"""`cvfm segment export --onnx`: both halves of a SAM, a SAM-HQ and a SAM 2, checked against the torch model
with onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from clitools import assert_usage_error

from cvfm.errors import CvfmError
from cvfm.models.segmenter import Segmenter
from cvfm.models.tiny_sam import INIT, PREPROCESS, tiny_sam_config
from cvfm.registry import create_segmenter
from cvfm.segment.onnx_export import EXTRA_FEATURES, onnx_prompts

pytestmark = pytest.mark.slow  # each export takes ~20 s on 2 cores: `make test-slow` runs these


def tiny_sam_hq() -> Segmenter:
    """A seeded random SamHQModel shaped as cvfm/tiny-sam."""
    from transformers import SamHQConfig, SamHQModel

    base = tiny_sam_config().to_dict()
    decoder = {**base["mask_decoder_config"], "vit_dim": base["vision_config"]["hidden_size"]}
    config = SamHQConfig(
        vision_config=base["vision_config"],
        prompt_encoder_config=base["prompt_encoder_config"],
        mask_decoder_config=decoder,
        initializer_range=INIT,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Segmenter(SamHQModel(config).eval(), "tiny-sam-hq", PREPROCESS)


@pytest.fixture(scope="module", params=["sam", "sam_hq", "sam2"])
def case(request, tmp_path_factory):
    """(the segmenter, the folder `cvfm segment export` wrote for it); SAM-HQ goes through a saved folder."""
    from typer.testing import CliRunner

    from cvfm.cli.app import app

    family, root = request.param, tmp_path_factory.mktemp(f"onnx-{request.param}")
    model = {"sam": "cvfm/tiny-sam", "sam2": "cvfm/tiny-sam2"}.get(family)
    if family == "sam_hq":
        model = str(tiny_sam_hq().save(root / "model"))
    folder = root / "onnx"
    result = CliRunner().invoke(app, ["segment", "export", model, "--onnx", "-o", str(folder)])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["files"] == ["decoder.onnx", "decoder_single.onnx", "encoder.onnx", "sam_onnx.json"]
    segmenter = create_segmenter(model)
    assert segmenter.family == family
    return segmenter, folder


def _session(folder, name):
    return ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])


def _features(emb) -> list[np.ndarray]:
    """An ImageEmbedding as the encoder's outputs: image_embeddings, then the family's extra features."""
    if isinstance(emb.features, list):  # SAM 2: the last level, then the higher-resolution ones
        return [f.numpy() for f in [emb.features[-1], *emb.features[:-1]]]
    extra = [emb.intermediate[0]] if emb.intermediate is not None else []
    return [f.numpy() for f in [emb.features, *extra]]


def _feed(segmenter, folder, emb, prompts) -> dict[str, np.ndarray]:
    info = json.loads((folder / "sam_onnx.json").read_text())
    names = info["encoder_outputs"]
    assert names == ["image_embeddings", *EXTRA_FEATURES[segmenter.family]]
    feed = dict(zip(names, _features(emb), strict=True)) | {k: v.numpy() for k, v in prompts.items()}
    assert sorted(feed) == sorted(info["decoder_inputs"])
    return feed


def test_encoder_equals_torch_on_a_batch(case):
    segmenter, folder = case
    pixels = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        refs = _features(segmenter.embed_image(pixels, [(128, 128)] * 3))
    outs = _session(folder, "encoder.onnx").run(None, {"pixel_values": pixels.numpy()})
    assert len(outs) == len(refs) == 1 + len(EXTRA_FEATURES[segmenter.family])
    for out, ref in zip(outs, refs, strict=True):
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
    info = json.loads((folder / "sam_onnx.json").read_text())
    assert info["input_size"] == 128 and info["family"] == segmenter.family
    assert info["preprocess"]["resize_mode"] == ("squash" if segmenter.family == "sam2" else "longest")


CASES = {
    "one click": dict(points=[[30.0, 40.0]], labels=[1]),
    "five clicks": dict(
        points=[[30.0, 40.0], [5.0, 90.0], [60.0, 11.0], [70.5, 70.5], [1.0, 1.0]], labels=[1, 0, 1, 1, 0]
    ),
    "box": dict(box=[10.0, 12.0, 70.0, 95.0]),
    "box and two clicks": dict(
        box=[10.0, 12.0, 70.0, 95.0], points=[[30.0, 40.0], [50.0, 20.0]], labels=[1, 0]
    ),
}


@pytest.mark.parametrize("prompt", list(CASES))
@pytest.mark.parametrize("multimask", [True, False])
def test_decoder_equals_torch_for_any_number_of_points(case, prompt, multimask):
    (segmenter, folder), c, original = case, CASES[prompt], (100, 77)  # (H, W): a non-square original
    pixels = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb = segmenter.embed_image(pixels, [original])
        points = torch.tensor([c["points"]]) if "points" in c else None
        labels = torch.tensor([c["labels"]]) if "labels" in c else None
        boxes = torch.tensor([c["box"]]) if "box" in c else None
        ref = segmenter.decode(emb, points=points, labels=labels, boxes=boxes, multimask=multimask)
    prompts = onnx_prompts(
        segmenter,
        original,
        points=points[0] if points is not None else None,
        labels=labels[0] if labels is not None else None,
        box=boxes[0] if boxes is not None else None,
    )
    name = "decoder.onnx" if multimask else "decoder_single.onnx"
    masks, iou = _session(folder, name).run(None, _feed(segmenter, folder, emb, prompts))
    assert masks.shape == ref.low_res_logits.shape and masks.shape[1] == (3 if multimask else 1)
    np.testing.assert_allclose(iou, ref.iou.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(masks, ref.low_res_logits.numpy(), rtol=0, atol=1e-4)
    assert ref.low_res_logits.abs().max() > 100 * 1e-4  # the logits are far larger than the tolerance


def test_mask_input_is_fed_back(case):
    (segmenter, folder), original = case, (128, 128)
    with torch.no_grad():
        pixels = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2))
        emb = segmenter.embed_image(pixels, [original])
        first = segmenter.decode(emb, points=torch.tensor([[[40.0, 40.0]]]))
        prev = first.low_res_logits[0, first.iou[0].argmax()][None]
        ref = segmenter.decode(emb, points=torch.tensor([[[40.0, 40.0]]]), mask_input=prev, multimask=False)
        without = segmenter.decode(emb, points=torch.tensor([[[40.0, 40.0]]]), multimask=False)
    assert not torch.allclose(ref.low_res_logits, without.low_res_logits, atol=1e-3)  # the mask matters
    prompts = onnx_prompts(segmenter, original, points=torch.tensor([[40.0, 40.0]]), mask_input=prev)
    masks, iou = _session(folder, "decoder_single.onnx").run(None, _feed(segmenter, folder, emb, prompts))
    np.testing.assert_allclose(masks, ref.low_res_logits.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(iou, ref.iou.numpy(), rtol=0, atol=1e-4)


def test_export_refuses_a_folder_in_use(case, cli):
    segmenter, folder = case
    assert_usage_error(cli("segment", "export", "cvfm/tiny-sam", "-o", str(folder)), "--onnx")
    with pytest.raises(CvfmError, match="not empty"):
        from cvfm.segment.onnx_export import export_onnx

        export_onnx(segmenter, folder)
