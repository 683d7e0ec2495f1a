"""SimCLR (Chen et al. 2020): two views, an MLP projector, NT-Xent with in-batch negatives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cvfm.data.views import MultiView, two_views
from cvfm.methods.base import Method, feature_std, gather_rows, mlp


@dataclass
class SimCLRConfig:
    temperature: float = 0.2  # solo-learn's CIFAR recipe; the paper uses 0.1 at batch 4096
    proj_hidden: int | None = None  # auto: the embedding size (paper: 2048 for a ResNet-50)
    proj_dim: int = 128
    min_scale: float = 0.08


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent / InfoNCE over 2N views: each view's positive is its pair, the other 2N-2 are negatives.

    With several processes, negatives come from every process (`gather_with_grad`).
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    everyone, offset = gather_rows(z)
    logits = z @ everyone.T / temperature
    rows = torch.arange(2 * n, device=z.device)
    logits[rows, rows + offset] = float("-inf")  # no self-similarity
    positives = torch.cat([rows[n:], rows[:n]]) + offset
    return F.cross_entropy(logits, positives)


class SimCLR(Method):
    base_lr = 2e-3
    weight_decay = (1e-4, 1e-4)

    def __init__(self, encoder, cfg: SimCLRConfig, budget):
        cfg.proj_hidden = cfg.proj_hidden or encoder.num_features
        super().__init__(encoder, cfg, budget)
        self.projector = mlp([encoder.num_features, cfg.proj_hidden, cfg.proj_dim])

    def views(self) -> MultiView:
        return two_views(self.encoder.preprocess, min_scale=self.cfg.min_scale)

    def forward(self, batch, step):
        h = self.encoder(torch.cat(batch["image"][:2]))
        z1, z2 = self.projector(h).chunk(2)
        loss = nt_xent(z1, z2, self.cfg.temperature)
        return loss, {"feature_std": feature_std(h)}
