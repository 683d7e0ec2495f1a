"""benchmarks/segment_probe.py: the ideal predictor's ceiling is exact at full resolution and below it at the
tiny SAM's; every probed shape builds and decodes; the box-only probe trains and scores."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "segment_probe.py"
_spec = importlib.util.spec_from_file_location("segment_probe", _PATH)
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)


def test_ceiling_is_one_at_full_resolution_and_below_at_the_tiny_sams():
    found = probe.ceiling(5, sides=(32, 64, 128))
    assert found[128] == 1.0
    assert found[32] < found[64] < 1.0


@pytest.mark.parametrize("shape", list(probe.SHAPES))
def test_every_shape_builds_and_decodes_at_its_resolution(shape):
    segmenter = probe.build(probe.SHAPES[shape])
    with torch.no_grad():
        emb = segmenter.embed_image(torch.randn(1, 3, 128, 128), [(96, 128)])
        pred = segmenter.decode(emb, boxes=torch.tensor([[10.0, 10.0, 60.0, 50.0]]), multimask=False)
    side = 128 if shape == "patch-4" else 64
    assert pred.low_res_logits.shape == (1, 1, side, side)


def test_box_probe_trains_and_scores():
    out = probe.train_boxes(probe.build({}), seconds=0.5, eval_images=10)
    assert out["steps"] >= 1 and 0.0 <= out["box_iou"] <= 1.0
