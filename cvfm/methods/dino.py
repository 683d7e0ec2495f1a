"""DINO (Caron et al. 2021): self-distillation with multi-crop, a centred and sharpened EMA teacher.

Defaults are main_dino.py's: student temperature 0.1, teacher 0.04 -> 0.07 warm-up, centre momentum
0.9, EMA 0.996 -> 1 (cosine), weight decay 0.04 -> 0.4, gradient clipping 3.0, last layer frozen
for the first epoch (at most 10% of the run), AdamW. One deviation: the learning rate is 2e-3 at batch
256, sqrt-scaled (1e-3 at batch 64, 4e-3 at 1024), not 5e-4 x batch / 256. On Animal-MNIST at batch 64,
1e-3 beat 5e-4 and 2e-3 (3 epochs, BN head, k-NN 79.9 vs 78.1 and 76.5). Sizes that depend on the data are
resolved from the dataset (see `DINOConfig.resolve`) and recorded in run.json.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cvfm.data.views import MultiView, multi_crop
from cvfm.errors import UsageError
from cvfm.methods.base import Budget, Method, ema_update, feature_std, frozen_copy
from cvfm.runtime.schedules import cosine, linear_then_constant


@dataclass
class DINOConfig:
    out_dim: int | None = None  # auto: 65536 (paper) for >= 1M images, else ~N/10 rounded to a power of 2
    hidden_dim: int | None = None  # auto: 2048 (paper) or 8x the embedding size when smaller
    bottleneck_dim: int = 256
    norm_last_layer: bool = True  # main_dino.py's --norm_last_layer: last layer's weight norm g fixed to 1
    head_bn: bool | None = None  # main_dino.py's --use_bn_in_head; auto: on for backbones with BatchNorm
    local_crops: int = 8
    local_size: int | None = None  # auto: 96/224 of the global size, at least 8 px, whole ViT patches
    global_scale: tuple = (0.4, 1.0)
    local_scale: tuple = (0.05, 0.4)
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float | None = None  # auto: 0.07 (paper) for >= 100k images, 0.04 below (DINO README)
    warmup_teacher_temp_epochs: float = 30  # capped at 30% of the run
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996
    freeze_last_layer_epochs: float = 1
    centering: bool = True  # off only to study collapse
    sharpening: bool = True  # off: the teacher uses the student's temperature

    def resolve(self, encoder, budget: Budget) -> DINOConfig:
        n, embed_dim, global_size = budget.num_images, encoder.num_features, encoder.preprocess.size
        if self.out_dim is None:
            self.out_dim = (
                65536 if n >= 1_000_000 else int(min(65536, max(256, 2 ** round(math.log2(n / 10)))))
            )
        self.hidden_dim = self.hidden_dim or min(2048, 8 * embed_dim)
        if self.local_size is None:
            self.local_size = max(8, round(global_size * 96 / 224))
            patch = getattr(getattr(getattr(encoder, "model", None), "patch_embed", None), "patch_size", None)
            if patch:  # a ViT: whole patches only
                p = patch[0] if isinstance(patch, (tuple, list)) else int(patch)
                self.local_size = max(p, round(self.local_size / p) * p)
        self.teacher_temp = self.teacher_temp or (0.07 if n >= 100_000 else 0.04)
        if self.head_bn is None:
            # Post-ReLU CNN features share a large common component; without BN in the head the centred
            # teacher is near-uniform and short runs collapse to it (tiny-resnet on Animal-MNIST, 3 epochs:
            # k-NN 75.1% without, 79.9% with; random init 79.2%).
            self.head_bn = any(isinstance(m, nn.BatchNorm2d) for m in encoder.modules())
        return self


def _check_input_size(encoder, size: int) -> None:
    """Local crops are smaller than global ones: refuse, clearly, a backbone with a fixed input size."""
    was_training = encoder.training
    try:
        with torch.no_grad():
            encoder.eval()(torch.zeros(1, 3, size, size))
    except (AssertionError, RuntimeError, ValueError) as e:
        raise UsageError(
            f"{encoder.name} cannot take {size}px local crops ({str(e).splitlines()[0]}): build it with "
            "dynamic_img_size=True, or pass --opt local_size=<its input size> or --opt local_crops=0"
        ) from None
    finally:
        encoder.train(was_training)


class DINOHead(nn.Module):
    """3-layer MLP (GELU) -> L2-normalised bottleneck -> weight-normalised linear layer (g fixed to 1
    unless `norm_last_layer=False`)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        norm = (lambda: nn.BatchNorm1d(hidden_dim)) if batch_norm else nn.Identity
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            norm(),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(
            nn.Linear(bottleneck_dim, out_dim, bias=False)
        )
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def dino_loss(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    center: torch.Tensor,
    n_crops: int,
    student_temp: float,
    teacher_temp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy between the centred, sharpened teacher on the 2 global crops and the student
    on every other crop. Returns (loss, teacher probabilities)."""
    student = (student_out / student_temp).chunk(n_crops)
    teacher_probs = F.softmax((teacher_out - center) / teacher_temp, dim=-1)
    teacher = teacher_probs.detach().chunk(2)
    total, pairs = 0.0, 0
    for iq, q in enumerate(teacher):
        for v, s in enumerate(student):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs, teacher_probs


class DINO(Method):
    base_lr = 2e-3
    weight_decay = (0.04, 0.4)
    clip_grad = 3.0
    summary_keys = ("feature_std", "teacher_entropy")

    def __init__(self, encoder, cfg: DINOConfig, budget: Budget):
        cfg.resolve(encoder, budget)
        super().__init__(encoder, cfg, budget)
        if cfg.local_crops:
            _check_input_size(encoder, cfg.local_size)
        self.head = DINOHead(
            encoder.num_features,
            cfg.out_dim,
            cfg.hidden_dim,
            cfg.bottleneck_dim,
            cfg.head_bn,
            cfg.norm_last_layer,
        )
        self.teacher = frozen_copy(nn.Sequential(encoder, self.head))
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        steps, per_epoch = budget.total_steps, budget.steps_per_epoch
        warm = min(int(cfg.warmup_teacher_temp_epochs * per_epoch), int(0.3 * steps))
        teacher_temp = cfg.teacher_temp if cfg.sharpening else cfg.student_temp
        self.teacher_temps = linear_then_constant(
            cfg.warmup_teacher_temp if cfg.sharpening else teacher_temp, teacher_temp, warm, steps
        )
        self.momentum = cosine(cfg.momentum_teacher, 1.0, steps)
        # One epoch of 100 in the paper; capped at 10% of shorter runs, like the warm-ups.
        self.freeze_last_layer_steps = min(int(cfg.freeze_last_layer_epochs * per_epoch), int(0.1 * steps))
        self.resolved = {
            "warmup_teacher_temp_steps": warm,
            "freeze_last_layer_steps": self.freeze_last_layer_steps,
        }

    def views(self) -> MultiView:
        c = self.cfg
        return multi_crop(
            self.encoder.preprocess,
            local_crops=c.local_crops,
            local_size=c.local_size,
            global_scale=tuple(c.global_scale),
            local_scale=tuple(c.local_scale),
        )

    def forward(self, batch, step):
        views = batch["image"]
        step = min(step, len(self.teacher_temps) - 1)
        globals_ = torch.cat(views[:2])
        with torch.no_grad():
            teacher_out = self.teacher(globals_)
        feats = [self.encoder(globals_)]
        if len(views) > 2:  # local crops share a size: one forward pass
            feats.append(self.encoder(torch.cat(views[2:])))
        h = torch.cat(feats)
        student_out = self.head(h)
        temp = float(self.teacher_temps[step])
        loss, probs = dino_loss(
            student_out, teacher_out, self.center, len(views), self.cfg.student_temp, temp
        )
        if self.cfg.centering:
            self.update_center(teacher_out)
        entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
        return loss, {
            "teacher_entropy": entropy,
            "teacher_entropy_max": math.log(self.cfg.out_dim),
            "teacher_temp": temp,
            "momentum": float(self.momentum[step]),
            "feature_std": feature_std(h[: globals_.shape[0]]),
        }

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.float().mean(dim=0, keepdim=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            batch_center /= torch.distributed.get_world_size()
        m = self.cfg.center_momentum
        self.center.mul_(m).add_(batch_center, alpha=1 - m)

    def before_optimizer_step(self, step):
        if step < self.freeze_last_layer_steps:
            for p in self.head.last_layer.parameters():
                p.grad = None

    def after_optimizer_step(self, step):
        m = float(self.momentum[min(step, len(self.momentum) - 1)])
        ema_update(self.teacher, nn.Sequential(self.encoder, self.head), m)
