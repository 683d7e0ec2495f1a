"""MAE (`cvfm pretrain --method mae`): random masking, the loss on masked patches of per-patch normalised
pixels, the run's export (the encoder without the decoder) and its reconstructions.png."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from clitools import assert_usage_error
from PIL import Image
from safetensors.torch import load_file

from cvfm.methods import Budget, build_method
from cvfm.methods.mae import masked_mse, patchify, random_mask, unpatchify
from cvfm.methods.reconstructions import HEADER, PAD, tile_size
from cvfm.pretrain import PretrainConfig, pretrain
from cvfm.registry import create_encoder

BUDGET = Budget(num_images=128, steps_per_epoch=4, total_steps=16, batch_size=32)


def _mae(**options):
    torch.manual_seed(0)
    return build_method("mae", create_encoder("cvfm/tiny-vit"), options, BUDGET)


def _images(n: int = 3, h: int = 32, w: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(1))


def _norm_pix_by_hand(images: torch.Tensor, p: int = 4) -> np.ndarray:
    """Each p x p patch (row-major), its pixels in (row, column, channel) order, minus its mean, over
    sqrt(unbiased variance + 1e-6)."""
    x = images.numpy().astype(np.float64)
    out = []
    for img in x:
        rows = []
        for i in range(img.shape[1] // p):
            for j in range(img.shape[2] // p):
                v = img[:, i * p : (i + 1) * p, j * p : (j + 1) * p].transpose(1, 2, 0).reshape(-1)
                rows.append((v - v.mean()) / np.sqrt(v.var(ddof=1) + 1e-6))
        out.append(rows)
    return np.array(out)


@pytest.mark.parametrize("length", [64, 49, 196])
def test_masking_keeps_a_quarter_of_the_patches_in_a_pattern_of_each_image(length):
    mask = random_mask(16, length, 0.75, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (16, length)
    assert (~mask).sum(1).tolist() == [round(length * 0.25)] * 16
    assert len({tuple(row.tolist()) for row in mask}) == 16  # a different pattern for every image
    again = random_mask(16, length, 0.75, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


def test_the_method_masks_by_its_ratio_and_the_encoder_sees_only_the_visible_patches():
    x = _images(4)
    for ratio, visible in (("0.75", 16), ("0.5", 32)):
        method = _mae(mask_ratio=ratio)
        pred, mask, _ = method.predict(x)
        assert pred.shape == (4, 64, 4 * 4 * 3)
        assert (~mask).sum(1).tolist() == [visible] * 4 and len({tuple(m.tolist()) for m in mask}) == 4
        assert method.encoder.encode(x, mask, drop=True).patch_tokens.shape == (4, visible, 96)


def test_the_loss_counts_masked_patches_only():
    pred = torch.zeros(1, 3, 2)
    target = torch.tensor([[[1.0, 1.0], [5.0, 5.0], [2.0, 4.0]]])
    mask = torch.tensor([[True, False, True]])
    assert masked_mse(pred, target, mask).item() == pytest.approx((1 + 10) / 2)  # patches 0 and 2
    target[0, 1] = 100.0  # a visible patch's target
    assert masked_mse(pred, target, mask).item() == pytest.approx(5.5)


def test_norm_pix_target_and_the_training_loss_match_a_hand_computation():
    method, x = _mae(), _images()
    by_hand = _norm_pix_by_hand(x)
    np.testing.assert_allclose(method.target(x).numpy(), by_hand, rtol=1e-4, atol=1e-5)

    torch.manual_seed(5)
    loss, logs = method({"image": [x]}, step=0)
    torch.manual_seed(5)  # the same mask
    pred, mask, _ = method.predict(x)
    per_patch = ((pred.detach().numpy() - by_hand) ** 2).mean(-1)
    assert loss.item() == pytest.approx(per_patch[mask.numpy()].mean(), rel=1e-5)
    assert abs(loss.item() - per_patch.mean()) > 1e-3  # the visible patches would change it
    raw = _mae(norm_pix_loss="false")
    np.testing.assert_array_equal(raw.target(x).numpy(), patchify(x, (4, 4)).numpy())


@pytest.mark.parametrize("size", [(32, 32), (36, 20)])
def test_patchify_is_the_official_layout_and_unpatchify_inverts_it(size):
    x = _images(2, *size)
    patches = patchify(x, (4, 4))
    assert patches.shape == (2, (size[0] // 4) * (size[1] // 4), 48)
    assert torch.equal(patches[1, 1], x[1, :, 0:4, 4:8].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, (size[0] // 4, size[1] // 4), (4, 4)), x)


def test_a_cnn_is_a_usage_error_naming_the_vits(cli, digit_folder, tmp_path):
    r = cli(
        "pretrain",
        "--data",
        digit_folder,
        "--method",
        "mae",
        "--model",
        "cvfm/tiny-resnet",
        "-o",
        tmp_path / "r",
    )
    assert_usage_error(r, "--method mae", "cvfm/tiny-resnet", "cvfm/tiny-vit")
    assert not (tmp_path / "r").exists()


@pytest.fixture(scope="module")
def run(digit_folder, tmp_path_factory):
    """128 digits at 32 px, batch 32, 4 epochs (16 steps), the official lr rule; 3 reconstructions."""
    out = tmp_path_factory.mktemp("mae") / "run"
    cfg = PretrainConfig(
        data=str(digit_folder),
        output=str(out),
        split="train",
        method="mae",
        epochs=4,
        batch_size=32,
        num_workers=0,
        options={"reconstructions": "3"},
    )
    return pretrain(cfg)


def test_a_short_run_lowers_the_loss_with_the_official_recipe(run):
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["model"] == "cvfm/tiny-vit"  # the method's default model
    assert record["resolved"]["lr"] == pytest.approx(1.5e-4 * 32 / 256)
    method = record["method_config"]
    assert method["mask_ratio"] == 0.75 and method["norm_pix_loss"] is True
    assert (method["decoder_dim"], method["decoder_depth"], method["decoder_heads"]) == (64, 2, 2)
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["epoch/loss"] for r in epochs if "epoch/loss" in r]
    assert len(losses) == 4  # 1.954, 1.813, 1.770, 1.711 on one CPU thread
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.92 * losses[0], losses


def test_the_export_is_the_plain_encoder_without_the_decoder(run):
    exported = load_file(run / "backbone" / "model.safetensors")
    assert exported.keys() == create_encoder("cvfm/tiny-vit").model.state_dict().keys()
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1] / "model.safetensors"
    trained = load_file(checkpoint)
    assert any(k.startswith("decoder.") for k in trained) and "decoder.mask_token" in trained
    encoder = create_encoder(str(run)).eval()
    with torch.no_grad():
        emb = encoder(_images(2))
    assert emb.shape == (2, 96) and torch.isfinite(emb).all()
    assert torch.equal(exported["cls_token"], trained["encoder.model.cls_token"])


def test_reconstructions_png_shows_three_rows_of_four_columns(run):
    picture = np.asarray(Image.open(run / "reconstructions.png").convert("RGB"))
    tile = tile_size(32)
    assert tile == 128
    assert picture.shape == (HEADER + 3 * tile + 4 * PAD, 4 * tile + 5 * PAD, 3)
    # row 1: the masked column shows 48 of its 64 patches (32 x 32 px once enlarged) at the data's mean
    # (0.5 -> 128); the last column shows the original at its 16 visible ones
    top, cell = HEADER + PAD, tile // 8

    def patches(column: int) -> np.ndarray:
        left = PAD + column * (tile + PAD)
        img = picture[top : top + tile, left : left + tile].astype(int)
        return img.reshape(8, cell, 8, cell, 3).transpose(0, 2, 1, 3, 4).reshape(64, -1)

    grey = (patches(1) == 128).all(1)
    assert grey.sum() == 48
    assert (patches(3)[~grey] == patches(0)[~grey]).all()
    assert (patches(2) != patches(0)).any()  # the reconstruction is the model's, not a copy
