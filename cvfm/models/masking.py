"""Patch masking for masked image modelling (iBOT, MAE, DINOv2): a ViT's patch embeddings replaced by a
learned mask token (iBOT, BEiT, DINOv2: every patch keeps its place) or dropped (MAE: the encoder sees only
the visible patches). `mask` is (B, N) bool over the patch grid in row-major order, True = masked.
"""

from __future__ import annotations

import torch
from torch import nn

from cvfm.errors import CvfmError


def check_mask(mask: torch.Tensor, batch: int, num_patches: int, drop: bool) -> torch.Tensor:
    """`mask` as (B, N) bool; a mask of another shape, or (to drop) rows masking different counts, is an
    error (dropped patches must leave every image the same number of tokens)."""
    mask = mask.reshape(mask.shape[0], -1) if mask.ndim == 3 else mask
    if mask.shape != (batch, num_patches):
        raise CvfmError(f"mask of shape {tuple(mask.shape)} for {batch} images of {num_patches} patches")
    mask = mask.bool()
    if drop:
        counts = mask.sum(1)
        if bool((counts != counts[0]).any()):
            raise CvfmError("to drop patches every image must mask the same number of them")
    return mask


def new_mask_token(dim: int) -> nn.Parameter:
    """A learned (1, 1, dim) mask token, initialised as BEiT and iBOT do (truncated normal, std 0.02)."""
    token = nn.Parameter(torch.zeros(1, 1, dim))
    nn.init.trunc_normal_(token, std=0.02)
    return token


def timm_vit_features(
    vit: nn.Module, x: torch.Tensor, mask: torch.Tensor, mask_token: torch.Tensor | None, drop: bool
) -> torch.Tensor:
    """timm's `VisionTransformer.forward_features` with masked patches replaced by `mask_token` before the
    position embedding is added, or dropped after it (the prefix tokens always stay)."""
    patches = vit.patch_embed(x)  # (B, N, D), or (B, H, W, D) when the model takes any image size
    batch, dim = patches.shape[0], patches.shape[-1]
    mask = check_mask(mask, batch, patches[..., 0].numel() // batch, drop)
    if not drop:
        replace = mask.reshape(patches.shape[:-1]).unsqueeze(-1)
        patches = torch.where(
            replace, mask_token.to(patches.dtype).reshape(1, *[1] * (patches.ndim - 2), dim), patches
        )
    tokens = vit._pos_embed(patches)
    if drop:
        prefix = vit.num_prefix_tokens
        keep = (~mask).nonzero()[:, 1].reshape(batch, -1)  # visible patches, in grid order
        visible = tokens[:, prefix:].gather(1, keep.unsqueeze(-1).expand(-1, -1, dim))
        tokens = torch.cat([tokens[:, :prefix], visible], dim=1)
    tokens = vit.norm_pre(vit.patch_drop(tokens))
    return vit.norm(vit.blocks(tokens))
