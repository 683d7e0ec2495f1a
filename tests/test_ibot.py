"""iBOT and DINOv2 (`cvfm pretrain --method ibot|dinov2`): block masks, the masked-patch loss, the patch
head's own centre, KoLeo, Sinkhorn-Knopp, short runs and their exports, a CNN refused."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from clitools import assert_usage_error
from safetensors.torch import load_file
from scipy import ndimage

from cvfm.methods import Budget, build_method
from cvfm.methods.dino import sinkhorn_knopp
from cvfm.methods.ibot import masked_patch_loss
from cvfm.methods.koleo import koleo_loss
from cvfm.models.masking import block_mask
from cvfm.pretrain import PretrainConfig, pretrain
from cvfm.registry import create_encoder

BUDGET = Budget(num_images=128, steps_per_epoch=4, total_steps=16, batch_size=32)


def _method(name: str, **options):
    torch.manual_seed(0)
    return build_method(name, create_encoder("cvfm/tiny-vit"), options, BUDGET)


def test_block_masks_are_few_rectangles_of_at_most_the_count_and_seeded():
    grid, count = (14, 14), 78  # 40% of the patches
    seeds = [torch.Generator().manual_seed(s) for s in range(50)]
    masks = [block_mask(grid, count, min_block=16, generator=g) for g in seeds]
    masked = [int(m.sum()) for m in masks]
    assert max(masked) <= count and np.mean(masked) > 0.9 * count, masked
    # blocks of >= 16 patches: a few connected regions, where scattered patches would make dozens
    regions = [ndimage.label(m.numpy())[1] for m in masks]
    scattered = ndimage.label((torch.rand(grid, generator=torch.Generator().manual_seed(0)) < 0.4).numpy())[1]
    assert max(regions) <= 5 and scattered > 10, (regions, scattered)
    again = block_mask(grid, count, min_block=16, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again, masks[7])


def test_ibot_masks_about_half_the_crops_at_ratios_from_0_1_to_0_5():
    method = _method("ibot")
    torch.manual_seed(1)
    masks = method.sample_masks(400, (8, 8))
    assert masks.shape == (400, 64)
    share = masks.float().mean(1)
    masked = share > 0
    assert 0.4 < masked.float().mean() < 0.6  # each crop independently with probability 0.5
    assert share.max() <= 0.5 and 0.2 < share[masked].mean() < 0.35  # U(0.1, 0.5), blocks rounding down


def test_dinov2_masks_exactly_half_the_crops_at_ratios_spread_over_the_range():
    method = _method("dinov2")
    torch.manual_seed(1)
    masks = method.sample_masks(64, (8, 8))
    share = masks.float().mean(1)
    assert int((share > 0).sum()) == 32  # int(64 x 0.5) crops, shuffled
    assert not (share[:32] > 0).all()
    assert share.max() <= 0.5 and 0.2 < share[share > 0].mean() < 0.35


def test_the_patch_loss_averages_each_images_masked_patches_then_all_images():
    torch.manual_seed(0)
    mask = torch.tensor([[True, False, True, False], [False, False, False, True], [False] * 4])
    student, teacher = torch.randn(3, 4, 5), torch.softmax(torch.randn(3, 4, 5), -1)
    loss = masked_patch_loss(student[mask], teacher[mask], mask, 0.1)

    def ce(b, n):
        return -(teacher[b, n] * torch.log_softmax(student[b, n] / 0.1, -1)).sum()

    by_hand = ((ce(0, 0) + ce(0, 2)) / 2 + ce(1, 3) + 0.0) / 3  # the unmasked image counts 0
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_the_method_predicts_masked_patches_only_and_moves_the_patch_centre_alone():
    method = _method("ibot")
    torch.manual_seed(0)
    tokens, teacher = torch.randn(2, 64, 96), torch.randn(2 * 64, method.cfg.patch_out_dim)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :10] = True
    mask[1, 30:33] = True
    center, patch_center = method.center.clone(), torch.randn_like(method.patch_center)
    method.patch_center.copy_(patch_center)
    loss = method.patch_loss(tokens, teacher, mask, 0.07)
    other = tokens.clone()
    other[~mask] = torch.randn_like(other[~mask])  # what the student says on visible patches: no matter
    method.patch_center.copy_(patch_center)
    assert method.patch_loss(other, teacher, mask, 0.07).item() == pytest.approx(loss.item(), rel=1e-6)
    # the patch head's own centre: an EMA (0.9) of the teacher's mean over every patch; the [CLS] one stays
    expected = 0.9 * patch_center + 0.1 * teacher.mean(0, keepdim=True)
    torch.testing.assert_close(method.patch_center, expected)
    assert torch.equal(method.center, center)


def test_koleo_is_minus_the_mean_log_distance_to_the_nearest_neighbour():
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    x[5] = 3 * x[0] + 0.01  # nearly the same direction as row 0: a small distance once normalised
    z = x.numpy().astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    d = np.linalg.norm(z[:, None] - z[None], axis=-1) + np.diag([np.inf] * 6)
    assert koleo_loss(x).item() == pytest.approx(-np.log(d.min(1)).mean(), rel=1e-5)


def test_sinkhorn_knopp_gives_each_sample_one_and_each_prototype_b_over_k():
    logits = torch.randn(12, 4, generator=torch.Generator().manual_seed(0)) * 0.2
    q = sinkhorn_knopp(logits, 0.1)  # dinov2's 3 iterations
    torch.testing.assert_close(q.sum(1), torch.ones(12))
    converged = sinkhorn_knopp(logits, 0.1, iterations=200)
    torch.testing.assert_close(converged.sum(1), torch.ones(12))
    torch.testing.assert_close(converged.sum(0), torch.full((4,), 12 / 4), rtol=1e-4, atol=1e-4)
    softmax = torch.softmax(logits / 0.1, -1).sum(0)  # far from balanced: Sinkhorn-Knopp evens it out
    assert (q.sum(0) - 3).abs().max() < 0.5 * (softmax - 3).abs().max()


@pytest.fixture(scope="module", params=[("ibot", "2"), ("dinov2", "0")], ids=["ibot", "dinov2"])
def run(request, digit_folder, tmp_path_factory):
    """128 digits at 32 px, batch 32, 2 epochs (8 steps); 2 local crops (ibot) or none, to keep it short."""
    name, local_crops = request.param
    out = tmp_path_factory.mktemp(name) / "run"
    cfg = PretrainConfig(
        data=str(digit_folder),
        output=str(out),
        split="train",
        method=name,
        epochs=2,
        batch_size=32,
        num_workers=0,
        options={"local_crops": local_crops},
    )
    return name, pretrain(cfg)


def test_a_short_run_lowers_the_losses_and_records_the_recipe(run):
    name, folder = run
    record = json.loads((folder / "run.json").read_text())
    assert record["config"]["model"] == "cvfm/tiny-vit"  # the method's default model
    method = record["method_config"]
    assert method["mask_probability"] == 0.5 and tuple(method["mask_ratio"]) == (0.1, 0.5)
    assert method["patch_out_dim"] == method["out_dim"] == 256  # 128 images: the floor of 256
    official = {"ibot": (True, False, 0.0, 0.996, 0.07), "dinov2": (False, True, 0.1, 0.992, 0.04)}
    assert (
        method["shared_head"],
        method["sinkhorn_knopp"],
        method["koleo_weight"],
        method["momentum_teacher"],
        method["teacher_patch_temp"],
    ) == official[name]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/patch_loss" in r]
    assert steps and all(0 < r["train/masked_share"] <= 0.5 for r in steps)
    losses = [r["epoch/loss"] for r in rows if "epoch/loss" in r]
    patch_losses = [r["epoch/patch_loss"] for r in rows if "epoch/patch_loss" in r]
    assert len(losses) == 2 and losses[1] < 0.98 * losses[0] and patch_losses[1] < patch_losses[0], losses


def test_the_export_is_the_plain_vit_without_heads_or_mask_token(run):
    name, folder = run
    exported = load_file(folder / "backbone" / "model.safetensors")
    assert exported.keys() == create_encoder("cvfm/tiny-vit").model.state_dict().keys()
    trained = load_file(sorted((folder / "checkpoints").glob("step-*"))[-1] / "model.safetensors")
    assert "encoder.mask_token" in trained and "patch_center" in trained
    assert any(k.startswith("patch_head.") for k in trained) == (name == "dinov2")
    assert torch.equal(exported["cls_token"], trained["encoder.model.cls_token"])
    encoder = create_encoder(str(folder)).eval()
    assert encoder.mask_token is None
    with torch.no_grad():
        emb = encoder(torch.randn(2, 3, 32, 32))
    assert emb.shape == (2, 96) and torch.isfinite(emb).all()


@pytest.mark.parametrize("name", ["ibot", "dinov2"])
def test_a_cnn_is_a_usage_error_naming_the_vits(cli, digit_folder, tmp_path, name):
    out = tmp_path / "r"
    r = cli("pretrain", "--data", digit_folder, "-m", name, "--model", "cvfm/tiny-resnet", "-o", out)
    assert_usage_error(r, f"--method {name}", "cvfm/tiny-resnet", "cvfm/tiny-vit")
    assert not out.exists()


def test_koleo_is_an_option_of_dino():
    method = _method("dino", koleo_weight="0.5", local_crops="0")
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    loss, logs = method({"image": views}, 0)
    plain = _method("dino", local_crops="0")
    base, _ = plain({"image": views}, 0)
    assert logs["koleo"] > 0 and math.isclose(loss.item(), base.item() + 0.5 * logs["koleo"], rel_tol=1e-5)
