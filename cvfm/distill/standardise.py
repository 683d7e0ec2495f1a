"""Per-dimension standardisation of the teacher's targets for the feature loss.

A teacher's embeddings share a large mean direction (post-ReLU pooling, a DINO backbone): with raw targets a
student that outputs that one direction for every image already scores a high cosine, and the loss barely
asks for more. Feature Distillation (Wei et al. 2022) standardises ("whitens") the teacher's features before
the loss, and DINO centres the teacher's outputs; both remove that shortcut. The choice here is per
dimension over the data, not per sample (FD's non-parametric LayerNorm subtracts each vector's own mean over
its dimensions, which keeps the direction shared across images): every dimension is centred and scaled by
its mean and variance over all the targets seen so far (a BatchNorm without affine and with cumulative
statistics, not an exponential average: the teacher is frozen, so its outputs' distribution is fixed, and
the statistics converge to the data's). After that a constant prediction is no better than chance. The
statistics are buffers, so they are checkpointed and a resumed run continues exactly."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class Standardise(nn.Module):
    """(..., D) targets minus the running mean, over the running standard deviation, per dimension; in
    training mode each call first adds its rows (all processes') to the statistics."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if self.training:
            self._update(x.reshape(-1, x.shape[-1]))
        return (x - self.mean) / (self.var + self.eps).sqrt()

    def _update(self, rows: torch.Tensor) -> None:
        """Chan et al.'s pairwise update: the mean and (population) variance of the old rows and these."""
        sums = torch.stack([rows.sum(0), rows.square().sum(0)])
        n = torch.tensor(rows.shape[0], device=rows.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(n)
        batch_mean = sums[0] / n
        batch_var = (sums[1] / n - batch_mean.square()).clamp(min=0)
        old, new = float(self.count), float(n)
        total, delta = old + new, batch_mean - self.mean
        self.var.copy_((self.var * old + batch_var * new + delta.square() * old * new / total) / total)
        self.mean.add_(delta * new / total)
        self.count.add_(n)
