"""The encoder face for masked image modelling: patch size, token grid, `encode(x, mask=...)`."""

from __future__ import annotations

import pytest
import timm
import torch

from cvfm.errors import CvfmError
from cvfm.models.encoder import HFEncoder
from cvfm.registry import create_encoder

PATCH = 4  # cvfm/tiny-vit: patch 4 at 32 px, any input size (timm's dynamic_img_size)


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return create_encoder("cvfm/tiny-vit", pretrained=False).eval()


def _images(h: int = 32, w: int = 32, n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _scramble(x: torch.Tensor, cells: list[int], cols: int) -> torch.Tensor:
    """`x` with fresh noise in the listed patches (row-major) of every image."""
    x = x.clone()
    for c in cells:
        r, q = divmod(c, cols)
        x[..., r * PATCH : (r + 1) * PATCH, q * PATCH : (q + 1) * PATCH] = torch.randn(
            x.shape[0], 3, PATCH, PATCH
        )
    return x


@pytest.mark.parametrize("size", [(32, 32), (36, 20), (8, 28)])
def test_vit_token_grid_matches_the_patch_tokens_on_odd_sizes(vit, size):
    assert vit.patch_size == (PATCH, PATCH)
    rows, cols = vit.token_grid(*size)
    assert (rows, cols) == (size[0] // PATCH, size[1] // PATCH)
    with torch.no_grad():
        assert vit.encode(_images(*size)).patch_tokens.shape == (2, rows * cols, vit.num_features)


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (17, 9)])
def test_conv_net_token_grid_is_its_feature_map(size):
    cnn = create_encoder("cvfm/tiny-resnet", pretrained=False).eval()
    assert cnn.patch_size == (16, 16)  # output_stride 16
    rows, cols = cnn.token_grid(*size)
    with torch.no_grad():
        assert cnn.encode(_images(*size)).patch_tokens.shape[1] == rows * cols
    with pytest.raises(CvfmError, match="cannot mask patches"):
        cnn.encode(_images(*size), torch.zeros(2, rows * cols, dtype=torch.bool), drop=True)


@pytest.mark.parametrize("drop", [False, True])
def test_an_empty_mask_changes_nothing(vit, drop):
    vit.add_mask_token()
    x = _images(36, 20)
    with torch.no_grad():
        plain = vit.encode(x)
        masked = vit.encode(x, torch.zeros(2, 9, 5, dtype=torch.bool), drop=drop)
    assert torch.equal(masked.pooled, plain.pooled)
    assert torch.equal(masked.patch_tokens, plain.patch_tokens)


@pytest.mark.parametrize("drop", [False, True])
def test_masked_patches_are_not_seen_and_visible_ones_are(vit, drop):
    vit.add_mask_token()
    x, rows, cols = _images(), 8, 8
    masked_cells = [0, 5, 9, 10, 27, 40, 63]
    mask = torch.zeros(2, rows * cols, dtype=torch.bool)
    mask[:, masked_cells] = True
    with torch.no_grad():
        out = vit.encode(x, mask, drop=drop)
        hidden = vit.encode(_scramble(x, masked_cells, cols), mask, drop=drop)
        seen = vit.encode(_scramble(x, [1, 2], cols), mask, drop=drop)
        plain = vit.encode(x)
    kept = rows * cols - (len(masked_cells) if drop else 0)
    assert out.patch_tokens.shape == (2, kept, vit.num_features)
    assert torch.equal(out.pooled, hidden.pooled) and torch.equal(out.patch_tokens, hidden.patch_tokens)
    assert (out.pooled - seen.pooled).abs().max() > 1e-3
    assert (out.pooled - plain.pooled).abs().max() > 1e-3  # masking itself changes what the model sees


def test_the_mask_token_learns_and_is_not_in_the_timm_export(vit, tmp_path):
    token = vit.add_mask_token()
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[:, ::3] = True
    vit.encode(_images(), mask).pooled.square().sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0
    assert "mask_token" in dict(vit.named_parameters())  # checkpointed with the run
    folder = vit.save(tmp_path / "export")
    reloaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # strict: no extra keys
    x = _images(20, 28)
    with torch.no_grad():
        assert torch.equal(reloaded.forward_features(x)[:, 1:], vit.encode(x).patch_tokens)


def test_bad_masks_get_clear_errors():
    fresh = create_encoder("cvfm/tiny-vit", pretrained=False)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    with pytest.raises(CvfmError, match="add_mask_token"):
        fresh.encode(_images(), mask)
    fresh.add_mask_token()
    with pytest.raises(CvfmError, match=r"mask of shape \(2, 63\) for 2 images of 64 patches"):
        fresh.encode(_images(), mask[:, :63])
    mask[0, :3] = True
    mask[1, :2] = True
    with pytest.raises(CvfmError, match="same number"):
        fresh.encode(_images(), mask, drop=True)


def _hf_vit(use_mask_token: bool) -> HFEncoder:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=32,
        patch_size=4,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
    )
    encoder = HFEncoder(
        ViTModel(config, add_pooling_layer=False, use_mask_token=use_mask_token), "tiny", None
    )
    return encoder.eval()


def test_transformers_vit_masks_with_its_own_mask_token():
    encoder = _hf_vit(use_mask_token=True)
    assert encoder.patch_size == (4, 4) and encoder.token_grid(32, 32) == (8, 8)
    assert encoder.add_mask_token() is encoder.model.embeddings.mask_token
    x, mask = _images(), torch.zeros(2, 64, dtype=torch.bool)
    mask[:, [3, 17, 60]] = True
    with torch.no_grad():
        out = encoder.encode(x, mask)
        reference = encoder.model(pixel_values=x, bool_masked_pos=mask).last_hidden_state
        hidden = encoder.encode(_scramble(x, [3, 17, 60], 8), mask)
    assert torch.equal(out.patch_tokens, reference[:, 1:]) and torch.equal(out.pooled, reference[:, 0])
    assert torch.equal(out.pooled, hidden.pooled)
    with pytest.raises(CvfmError, match="cannot mask patches"):
        encoder.encode(x, mask, drop=True)
    with pytest.raises(CvfmError, match="use_mask_token=True"):
        _hf_vit(use_mask_token=False).encode(x, mask)
