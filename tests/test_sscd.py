"""SSCD, the copy-detection descriptor: its loss against a loop transcription of sscd-copy-detection's
`SSCD.loss` (one process, no mixup), its copy-edit views, and a run whose descriptor `cvfm embed` reads."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cvfm.data.views import Preprocess, copy_edit
from cvfm.methods.sscd import SSCDConfig, sscd_loss


def _unit(v: np.ndarray) -> np.ndarray:
    return v / math.sqrt(sum(float(x) ** 2 for x in v))


def _sscd_by_hand(z1: np.ndarray, z2: np.ndarray, t: float, weight: float) -> tuple[float, float]:
    """sscd/train.py: per view, -log of its positive's exp(s/t) over itself plus the sum over views of other
    images; entropy: -weight * mean log sqrt(2 - 2 max similarity to a view of another image)."""
    n = len(z1)
    z = [_unit(v) for v in list(z1) + list(z2)]
    image = list(range(n)) * 2
    infonce = entropy = 0.0
    for i in range(2 * n):
        pos = i + n if i < n else i - n
        sims = [float(np.dot(z[i], z[j])) for j in range(2 * n)]
        others = [j for j in range(2 * n) if image[j] != image[i]]
        negatives = sum(math.exp(sims[j] / t) for j in others)
        infonce += -math.log(math.exp(sims[pos] / t) / (math.exp(sims[pos] / t) + negatives))
        nearest = max(sims[j] for j in others)
        entropy += -math.log(math.sqrt(max(2 - 2 * nearest, 1e-6)))
    return infonce / (2 * n), weight * entropy / (2 * n)


@pytest.mark.parametrize(("temperature", "weight"), [(0.05, 30.0), (0.2, 1.0)])
def test_sscd_loss_matches_the_reference_formula(temperature, weight):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    infonce, entropy = sscd_loss(z1, z2, temperature, weight)
    want_infonce, want_entropy = _sscd_by_hand(z1.double().numpy(), z2.double().numpy(), temperature, weight)
    assert float(infonce) == pytest.approx(want_infonce, rel=1e-5)
    assert float(entropy) == pytest.approx(want_entropy, rel=1e-5)


def test_sscd_entropy_ignores_the_other_view_of_the_same_image():
    """Identical views, images orthogonal to each other: each view's nearest other image is sqrt(2) away, so
    the entropy term is -weight * log sqrt(2), however close the two views are."""
    z = torch.eye(4)
    _, entropy = sscd_loss(z, z.clone(), 0.05, 10.0)
    assert float(entropy) == pytest.approx(-10.0 * math.log(math.sqrt(2)), rel=1e-6)
    # two images made identical: their distance is 0, clamped as the reference does (sqrt 1e-6)
    z2 = z.clone()
    z2[1] = z2[0]
    _, crowded = sscd_loss(z2, z2.clone(), 0.05, 10.0)
    assert float(crowded) > float(entropy) + 10.0


def test_sscd_gradient_pulls_views_together_and_pushes_images_apart():
    z1 = torch.tensor([[1.0, 0.1], [0.9, 0.3]], requires_grad=True)
    z2 = torch.tensor([[0.8, 0.5], [1.0, -0.2]])
    infonce, entropy = sscd_loss(z1, z2, 0.1, 1.0)
    (infonce + entropy).backward()
    assert torch.isfinite(z1.grad).all() and z1.grad.abs().sum() > 0


def test_copy_edit_views_are_normalised_tensors_at_the_model_size():
    pre = Preprocess(size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    t = copy_edit(pre, min_scale=0.5, jpeg_p=1.0)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 41, 3), dtype=np.uint8))
    torch.manual_seed(0)
    a, b = t(photo), t(photo)
    assert a.shape == b.shape == (3, 32, 32) and a.dtype == torch.float32
    assert not torch.equal(a, b)  # random edits
    names = [type(op).__name__ for op in t.transforms]
    assert names[:2] == ["ToImage", "RandomHorizontalFlip"] and "RandomResizedCrop" in names
    jpeg = [op for op in t.transforms if type(op).__name__ == "RandomApply" and "JPEG" in repr(op)]
    assert len(jpeg) == 1 and jpeg[0].p == 1.0
    assert "JPEG" not in repr(copy_edit(pre, jpeg_p=0.0))
    assert "GaussianBlur" not in repr(t)  # blur only from 64 px, as the other recipes
    assert "GaussianBlur" in repr(copy_edit(Preprocess(size=64, mean=pre.mean, std=pre.std)))


def test_sscd_defaults_are_the_reference_train_py_defaults():
    cfg = SSCDConfig()
    assert (cfg.temperature, cfg.entropy_weight, cfg.min_scale, cfg.jpeg_p) == (0.05, 30.0, 0.08, 0.2)


def test_sscd_run_writes_a_descriptor_that_embed_reads(digit_folder, tmp_path, cli):
    run = tmp_path / "sscd"
    args = ["pretrain", "--data", digit_folder, "--split", "train", "--method", "sscd", "--epochs", "1"]
    result = cli(*args, "--batch-size", "32", "--num-workers", "0", "-o", run)
    assert result.code == 0, result.stderr
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["method"] == "sscd" and record["status"] == "finished"
    assert record["method_config"]["temperature"] == 0.05
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["epoch/entropy"]) for m in metrics if "epoch" in m)
    assert sum("epoch" in m for m in metrics) == 1
    out = tmp_path / "emb"
    result = cli("embed", run, "--data", digit_folder, "--split", "test", "-o", out)
    assert result.code == 0, result.stderr
    from cvfm.curate import EmbeddingPool

    pool = EmbeddingPool(out)
    assert len(pool) == 32
