"""`cvfm segment export --onnx`: both halves of a SAM, checked against the torch model with onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from clitools import assert_usage_error

from cvfm.errors import CvfmError
from cvfm.registry import create_segmenter
from cvfm.segment.onnx_export import onnx_prompts

pytestmark = pytest.mark.slow  # the export takes ~20 s on 2 cores: `make test-slow` runs these


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from typer.testing import CliRunner

    from cvfm.cli.app import app

    folder = tmp_path_factory.mktemp("onnx") / "sam"
    result = CliRunner().invoke(app, ["segment", "export", "cvfm/tiny-sam", "--onnx", "-o", str(folder)])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["files"] == ["decoder.onnx", "decoder_single.onnx", "encoder.onnx", "sam_onnx.json"]
    return folder


@pytest.fixture(scope="module")
def sam():
    return create_segmenter("cvfm/tiny-sam")


def _session(folder, name):
    return ort.InferenceSession(str(folder / name), providers=["CPUExecutionProvider"])


def test_encoder_equals_torch_on_a_batch(exported, sam):
    pixels = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = sam.embed_image(pixels, [(128, 128)] * 3).features.numpy()
    out = _session(exported, "encoder.onnx").run(None, {"pixel_values": pixels.numpy()})[0]
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
    info = json.loads((exported / "sam_onnx.json").read_text())
    assert info["input_size"] == 128 and info["preprocess"]["resize_mode"] == "longest"


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


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("multimask", [True, False])
def test_decoder_equals_torch_for_any_number_of_points(exported, sam, case, multimask):
    c, original = CASES[case], (100, 77)  # (H, W): a non-square original
    pixels = torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        emb = sam.embed_image(pixels, [original])
        points = torch.tensor([c["points"]]) if "points" in c else None
        labels = torch.tensor([c["labels"]]) if "labels" in c else None
        boxes = torch.tensor([c["box"]]) if "box" in c else None
        ref = sam.decode(emb, points=points, labels=labels, boxes=boxes, multimask=multimask)
    feed = onnx_prompts(
        sam,
        original,
        points=points[0] if points is not None else None,
        labels=labels[0] if labels is not None else None,
        box=boxes[0] if boxes is not None else None,
    )
    feed = {k: v.numpy() for k, v in feed.items()} | {"image_embeddings": emb.features.numpy()}
    name = "decoder.onnx" if multimask else "decoder_single.onnx"
    masks, iou = _session(exported, name).run(None, feed)
    assert masks.shape == (1, 3 if multimask else 1, 64, 64)
    np.testing.assert_allclose(iou, ref.iou.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(masks, ref.low_res_logits.numpy(), rtol=0, atol=1e-4)
    assert ref.low_res_logits.abs().max() > 100 * 1e-4  # the logits are far larger than the tolerance


def test_mask_input_is_fed_back(exported, sam):
    original = (128, 128)
    with torch.no_grad():
        emb = sam.embed_image(
            torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(2)), [original]
        )
        first = sam.decode(emb, points=torch.tensor([[[40.0, 40.0]]]))
        prev = first.low_res_logits[0, first.iou[0].argmax()][None]
        ref = sam.decode(emb, points=torch.tensor([[[40.0, 40.0]]]), mask_input=prev, multimask=False)
    feed = onnx_prompts(sam, original, points=torch.tensor([[40.0, 40.0]]), mask_input=prev)
    feed = {k: v.numpy() for k, v in feed.items()} | {"image_embeddings": emb.features.numpy()}
    masks, iou = _session(exported, "decoder_single.onnx").run(None, feed)
    np.testing.assert_allclose(masks, ref.low_res_logits.numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(iou, ref.iou.numpy(), rtol=0, atol=1e-4)


def test_export_refuses_a_folder_in_use(exported, cli):
    assert_usage_error(cli("segment", "export", "cvfm/tiny-sam", "-o", str(exported)), "--onnx")
    with pytest.raises(CvfmError, match="not empty"):
        from cvfm.segment.onnx_export import export_onnx

        export_onnx(create_segmenter("cvfm/tiny-sam"), exported)
