"""BYOL (Grill et al. 2020): online network + predictor chases an EMA target; no negatives."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cvfm.data.views import MultiView, two_views
from cvfm.methods.base import Method, ema_update, feature_std, frozen_copy, mlp
from cvfm.runtime.schedules import cosine


@dataclass
class BYOLConfig:
    momentum: float = 0.99  # EMA start, cosine to 1 (paper: 0.996 at ImageNet scale, 0.99 for short runs)
    proj_hidden: int | None = None  # auto: 4096 (paper) or 8x the embedding size when that is smaller
    proj_dim: int = 256
    min_scale: float = 0.08


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z), averaged; `z` comes from the target and carries no gradient."""
    return (2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1)).mean()


class BYOL(Method):
    base_lr = 2e-3
    weight_decay = (1e-6, 1e-6)

    def __init__(self, encoder, cfg: BYOLConfig, budget):
        cfg.proj_hidden = cfg.proj_hidden or min(4096, 8 * encoder.num_features)
        super().__init__(encoder, cfg, budget)
        self.projector = mlp([encoder.num_features, cfg.proj_hidden, cfg.proj_dim])
        self.predictor = mlp([cfg.proj_dim, cfg.proj_hidden, cfg.proj_dim])
        self.target = frozen_copy(nn.Sequential(encoder, self.projector))
        self.momentum = cosine(cfg.momentum, 1.0, budget.total_steps)

    def views(self) -> MultiView:
        return two_views(self.encoder.preprocess, min_scale=self.cfg.min_scale, asymmetric=True)

    def forward(self, batch, step):
        x = torch.cat(batch["image"][:2])
        h = self.encoder(x)
        p1, p2 = self.predictor(self.projector(h)).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target(x).chunk(2)
        loss = byol_loss(p1, z2) + byol_loss(p2, z1)  # symmetric
        return loss, {"feature_std": feature_std(h), "momentum": float(self.momentum[step])}

    def after_optimizer_step(self, step):
        online = nn.Sequential(self.encoder, self.projector)
        ema_update(self.target, online, float(self.momentum[min(step, len(self.momentum) - 1)]))
