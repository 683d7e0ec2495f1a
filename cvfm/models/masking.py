"""Patch masking for masked image modelling (iBOT, MAE, DINOv2): a ViT's patch embeddings replaced by a
learned mask token (iBOT, BEiT, DINOv2: every patch keeps its place) or dropped (MAE: the encoder sees only
the visible patches). `mask` is (B, N) bool over the patch grid in row-major order, True = masked.
"""

from __future__ import annotations

import math

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


def block_mask(
    grid: tuple[int, int],
    count: int,
    *,
    min_block: float,
    max_block: float | None = None,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A (rows, cols) bool mask of about `count` patches in rectangular blocks (BEiT's generator, which
    iBOT and DINOv2 use): each block's area is drawn in [min_block, what is left (at most max_block)], its
    aspect ratio log-uniformly in `aspect`, its place uniformly; a block that would add no patch or too many
    is redrawn (10 tries). Blocks are added until `count` patches are masked or none fits."""
    rows, cols = grid
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    def randint(hi: int) -> int:  # 0..hi inclusive
        return int(torch.randint(hi + 1, (), generator=generator))

    masked = 0
    while masked < count:
        room = count - masked if max_block is None else min(count - masked, max_block)
        added = 0
        for _ in range(10):
            area, ratio = uniform(min_block, room), math.exp(uniform(*log_aspect))
            h, w = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if h >= rows or w >= cols:
                continue
            top, left = randint(rows - h), randint(cols - w)
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= room:
                block.fill_(True)
                added = new
                break
        if not added:
            break
        masked += added
    return mask
