"""DINOv2's recipe (Oquab et al. 2024): iBOT with separate [CLS] and patch heads, Sinkhorn-Knopp teacher
targets and the KoLeo regulariser on the student's class tokens.

Defaults are facebookresearch/dinov2's: ssl_default_config.yaml (EMA 0.992 -> 1, teacher temperature 0.04
-> 0.07 for both heads, KoLeo weight 0.1, half of the global crops masked at ratios spread evenly over
(0.1, 0.5), crops (0.32, 1) and (0.05, 0.32), 8 local crops) with the ViT-L/g training configs'
`ibot.separate_head: true` and `centering: sinkhorn_knopp` (`--opt sinkhorn_knopp=false` centres as DINO).
Its learning rate, 4e-3 at batch 1024 square-root scaled, is `dino`'s 2e-3 at batch 256. Sizes that depend
on the data are resolved as `dino` resolves them and recorded in run.json. Not carried over: stochastic
depth, layer-wise lr decay and the patch embedding's lower lr (properties of the ViT-L/g runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cvfm.methods.ibot import IBOT, IBOTConfig
from cvfm.models.masking import block_mask


@dataclass
class DINOv2Config(IBOTConfig):
    local_crops: int = 8
    global_scale: tuple = (0.32, 1.0)
    local_scale: tuple = (0.05, 0.32)
    momentum_teacher: float = 0.992
    shared_head: bool = False
    sinkhorn_knopp: bool = True
    koleo_weight: float = 0.1
    teacher_patch_temp: float | None = None  # the [CLS] head's


class DINOv2(IBOT):
    center_all_patches = False  # targets (and a centre) for the masked patches only

    def sample_masks(self, n: int, grid: tuple[int, int]) -> torch.Tensor:
        """(n, rows x cols) bool: int(n x mask_probability) crops masked, the i-th at a ratio drawn from the
        i-th of as many equal slices of `mask_ratio`, in blocks of 4 patches to half the grid (dinov2's
        collate_data_and_cast and MaskingGenerator); the crops are then shuffled."""
        (lo, hi), (rows, cols) = self.cfg.mask_ratio, grid
        patches, masked = rows * cols, int(n * self.cfg.mask_probability)
        edges = torch.linspace(lo, hi, masked + 1).tolist()
        masks = torch.zeros(n, patches, dtype=torch.bool)
        for i in range(masked):
            ratio = edges[i] + (edges[i + 1] - edges[i]) * float(torch.rand(()))
            masks[i] = block_mask(grid, int(patches * ratio), min_block=4, max_block=0.5 * patches).flatten()
        return masks[torch.randperm(n)]
