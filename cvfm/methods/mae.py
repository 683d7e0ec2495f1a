"""MAE (He et al. 2022): the encoder sees a random 25% of the patches, a light decoder fills the rest in
from mask tokens, and the loss is the MSE of the masked patches' pixels, each patch normalised by its own
mean and variance.

Defaults are the official recipe (facebookresearch/mae, PRETRAIN.md and main_pretrain.py): mask ratio 0.75
by per-image random shuffling, norm_pix_loss on, AdamW with betas (0.9, 0.95) and weight decay 0.05 (none
on biases and norms), lr = 1.5e-4 x batch / 256 (the linear rule) after a linear warm-up, then cosine;
RandomResizedCrop(0.2, 1) and a flip. The decoder (official: 512 wide, 8 deep, 16 heads, fixed 2-D sin-cos
positions) is scaled down for narrow encoders (see `MAEConfig.resolve`); it is trained and checkpointed
with the run but not exported: backbone/ is the plain encoder. Two differences from the official model:
the encoder keeps the registry ViT's own (learned) position embedding and initialisation, so that the
export loads as that ViT; and its visible tokens stay in grid order (the official shuffles them; a
transformer does not care). The decoder gets the encoder's pooled embedding where the official passes the
class token: the same token for a ViT pooled by its class token, as cvfm/tiny-vit is.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from timm.layers import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block
from torch import nn

from cvfm.data.loader import ImageDataset, Skipped
from cvfm.data.sources import ImageSource
from cvfm.data.views import MultiView, crop_flip
from cvfm.errors import UsageError
from cvfm.methods.base import Budget, Method, feature_std, require_patch_masking
from cvfm.methods.reconstructions import write_reconstructions

NORM_PIX_EPS = 1e-6  # models_mae.py: (x - mean) / (var + 1e-6) ** 0.5


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True  # PRETRAIN.md's recipe; off: raw pixels as the target
    decoder_dim: int | None = None  # auto: 512 (official) for encoders >= 768 wide, else half the width
    decoder_depth: int | None = None  # auto: 8 (official) for encoders >= 768 wide, else 2
    decoder_heads: int | None = None  # auto: heads of 32 dimensions (official: 16 x 32)
    min_scale: float = 0.2  # RandomResizedCrop scale (min_scale, 1)
    reconstructions: int = 0  # at the end, a PNG grid of this many images: reconstructions.png

    def resolve(self, width: int) -> MAEConfig:
        wide = width >= 768  # ViT-B and larger get the official decoder
        self.decoder_dim = self.decoder_dim or (512 if wide else max(32, -(-width // 2 // 32) * 32))
        self.decoder_depth = self.decoder_depth or (8 if wide else 2)
        self.decoder_heads = self.decoder_heads or max(1, self.decoder_dim // 32)
        if not 0 < self.mask_ratio < 1:
            raise UsageError(f"option mask_ratio={self.mask_ratio}: must be between 0 and 1")
        if self.decoder_dim % 4 or self.decoder_dim % self.decoder_heads:
            raise UsageError(
                f"option decoder_dim={self.decoder_dim}: must be a multiple of 4 (2-D sin-cos positions) "
                f"and of decoder_heads={self.decoder_heads}"
            )
        if self.reconstructions < 0:
            raise UsageError(f"option reconstructions={self.reconstructions}: must be 0 or more")
        return self


def random_mask(
    batch: int, length: int, ratio: float, device=None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(batch, length) bool, True = masked: each image keeps int(length x (1 - ratio)) patches drawn by
    sorting uniform noise, as models_mae.py's `random_masking`."""
    keep = int(length * (1 - ratio))
    noise = torch.rand(batch, length, generator=generator, device=generator.device if generator else device)
    kept = noise.argsort(dim=1)[:, :keep]
    mask = torch.ones(batch, length, dtype=torch.bool, device=noise.device)
    return mask.scatter_(1, kept, False).to(device)


def patchify(images: torch.Tensor, patch: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) -> (B, rows x cols, p x q x C): each patch's pixels, row-major, channels last (the
    official layout); a remainder the patch grid does not cover is left out, as the patch embedding does."""
    b, c, h, w = images.shape
    (p, q), rows, cols = patch, h // patch[0], w // patch[1]
    x = images[..., : rows * p, : cols * q].reshape(b, c, rows, p, cols, q)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, p * q * c)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch: tuple[int, int]) -> torch.Tensor:
    """The inverse of `patchify`: (B, rows x cols, p x q x C) -> (B, C, rows x p, cols x q)."""
    (rows, cols), (p, q), b = grid, patch, patches.shape[0]
    x = patches.reshape(b, rows, cols, p, q, -1).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, -1, rows * p, cols * q)


def patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's mean and std over its pixels (unbiased variance + 1e-6, as models_mae.py)."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + NORM_PIX_EPS).sqrt()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The per-patch mean squared error, averaged over the masked patches only."""
    per_patch = (pred.float() - target.float()).square().mean(dim=-1)
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum()


class MAEDecoder(nn.Module):
    """The encoder's tokens projected to the decoder's width, a mask token at every masked place, fixed 2-D
    sin-cos positions (none on the class token), transformer blocks, a linear layer to each patch's pixels."""

    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, patch_pixels: int):
        super().__init__()
        self.embed = nn.Linear(in_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(
            *(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(depth))
        )
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(
        self, pooled: torch.Tensor, visible: torch.Tensor, mask: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """(B, L, patch pixels) predicted for all L patches from the pooled token (B, D), the visible
        patches' tokens (B, L_visible, D) in grid order and `mask` (B, L)."""
        x = self.embed(torch.cat([pooled.unsqueeze(1), visible], dim=1))
        cls, seen, dim = x[:, :1], x[:, 1:], x.shape[-1]
        places = (~mask).unsqueeze(-1)
        patches = torch.zeros(*mask.shape, dim, dtype=x.dtype, device=x.device).masked_scatter(places, seen)
        patches = torch.where(places, patches, self.mask_token.to(x.dtype))
        pos = build_sincos2d_pos_embed(list(grid), dim, device=x.device).to(x.dtype)
        x = self.norm(self.blocks(torch.cat([cls, patches + pos], dim=1)))
        return self.pred(x[:, 1:])


def _init_weights(m: nn.Module) -> None:
    """models_mae.py: Xavier-uniform linear layers with zero biases; LayerNorms at 1 and 0."""
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class MAE(Method):
    default_model = "cvfm/tiny-vit"
    base_lr = 1.5e-4  # PRETRAIN.md's blr, scaled linearly by the global batch (`peak_lr`)
    weight_decay = (0.05, 0.05)
    adam_betas = (0.9, 0.95)

    def __init__(self, encoder, cfg: MAEConfig, budget: Budget):
        cfg.resolve(encoder.num_features)
        require_patch_masking(encoder, "mae", drop=True)
        super().__init__(encoder, cfg, budget)
        self.patch = tuple(encoder.patch_size)
        self.decoder = MAEDecoder(
            encoder.num_features,
            cfg.decoder_dim,
            cfg.decoder_depth,
            cfg.decoder_heads,
            3 * self.patch[0] * self.patch[1],
        )

    def peak_lr(self, batch_size: int) -> float:
        """main_pretrain.py: blr x global batch / 256."""
        return self.base_lr * batch_size / 256

    def views(self) -> MultiView:
        return crop_flip(self.encoder.preprocess, min_scale=self.cfg.min_scale)

    def predict(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pixels predicted for every patch (B, L, p x q x C), the mask (B, L), the pooled embedding) of a
        fresh random mask (drawn from `generator`, else the global RNG)."""
        grid = self.encoder.token_grid(*images.shape[-2:])
        mask = random_mask(images.shape[0], grid[0] * grid[1], self.cfg.mask_ratio, images.device, generator)
        out = self.encoder.encode(images, mask, drop=True)
        return self.decoder(out.pooled, out.patch_tokens, mask, grid), mask, out.pooled

    def target(self, images: torch.Tensor) -> torch.Tensor:
        """Each patch's pixels, normalised by the patch's own mean and std with `norm_pix_loss`."""
        patches = patchify(images, self.patch)
        if not self.cfg.norm_pix_loss:
            return patches
        mean, std = patch_stats(patches)
        return (patches - mean) / std

    def forward(self, batch, step):
        images = batch["image"][0]
        pred, mask, pooled = self.predict(images)
        loss = masked_mse(pred, self.target(images), mask)
        return loss, {"feature_std": feature_std(pooled)}

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """[original, masked (masked patches at 0, the data's mean), reconstruction, reconstruction with the
        visible patches pasted in], each (B, C, H', W') over the patch grid, in the input's normalisation.
        With `norm_pix_loss` the prediction is in each patch's own normalisation: it takes the original
        patch's mean and std back (the official demo shows a model trained on raw pixels: none needed)."""
        was_training = self.training
        self.eval()
        try:
            pred, mask, _ = self.predict(images, generator)
        finally:
            self.train(was_training)
        patches = patchify(images, self.patch)
        if self.cfg.norm_pix_loss:
            mean, std = patch_stats(patches)
            pred = pred.float() * std + mean
        grid = self.encoder.token_grid(*images.shape[-2:])
        hidden = mask.unsqueeze(-1).float()
        original = unpatchify(patches, grid, self.patch)
        shown = [patches * (1 - hidden), pred, patches * (1 - hidden) + pred * hidden]
        return [original] + [unpatchify(x, grid, self.patch) for x in shown]

    def after_training(self, folder: Path, source: ImageSource) -> None:
        """reconstructions.png: `reconstructions` images spread evenly over the training data, with the
        evaluation preprocessing and a mask drawn from seed 0 (the same weights draw the same picture)."""
        n = self.cfg.reconstructions
        if not n:
            return
        data = ImageDataset(source, self.encoder.preprocess.transform())
        picks = np.unique(np.linspace(0, len(data) - 1, min(n, len(data))).round().astype(int))
        samples = [s for s in map(data.__getitem__, picks) if not isinstance(s, Skipped)]
        if not samples:
            return
        device = next(self.parameters()).device
        images = torch.stack([s["image"] for s in samples]).to(device)
        columns = self.reconstruct(images, torch.Generator().manual_seed(0))
        write_reconstructions(folder / "reconstructions.png", columns, self.encoder.preprocess)
