"""DINO (Caron et al. 2021): self-distillation with multi-crop, a centred and sharpened EMA teacher.

Defaults are main_dino.py's: student temperature 0.1, teacher 0.04 -> 0.07 warm-up, centre momentum
0.9, EMA 0.996 -> 1 (cosine), weight decay 0.04 -> 0.4, gradient clipping 3.0, last layer frozen
for the first epoch (at most 10% of the run), AdamW. One deviation: the learning rate is 2e-3 at batch
256, sqrt-scaled (1e-3 at batch 64, 4e-3 at 1024), not 5e-4 x batch / 256. On Animal-MNIST at batch 64,
1e-3 beat 5e-4 and 2e-3 (3 epochs, BN head, k-NN 79.9 vs 78.1 and 76.5). Sizes that depend on the data are
resolved from the dataset (see `DINOConfig.resolve`) and recorded in run.json. Two options from DINOv2, off
by default: the KoLeo regulariser (`koleo_weight`) and Sinkhorn-Knopp teacher targets (`sinkhorn_knopp`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cvfm.data.views import MultiView, multi_crop
from cvfm.errors import UsageError
from cvfm.methods.base import Budget, Method, ema_update, feature_std, frozen_copy
from cvfm.methods.koleo import koleo_loss
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
    sinkhorn_knopp: bool = False  # DINOv2's alternative to centring: 3 Sinkhorn-Knopp iterations
    koleo_weight: float = 0.0  # DINOv2's KoLeo regulariser on the student's global-crop embeddings

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
    teacher_probs = F.softmax((teacher_out - center) / teacher_temp, dim=-1)
    return cross_view_loss(student_out, teacher_probs, n_crops, student_temp), teacher_probs


def cross_view_loss(
    student_out: torch.Tensor, teacher_probs: torch.Tensor, n_crops: int, student_temp: float
) -> torch.Tensor:
    """The mean cross-entropy of the teacher's probabilities on each global crop against the student's
    logits on every other crop (`n_crops` chunks, the 2 global crops first)."""
    student = (student_out / student_temp).chunk(n_crops)
    teacher = teacher_probs.detach().chunk(2)
    total, pairs = 0.0, 0
    for iq, q in enumerate(teacher):
        for v, s in enumerate(student):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    """`x` summed (or reduced by `op`) over all processes, in place; itself on one process."""
    if _distributed():
        torch.distributed.all_reduce(x, op=op or torch.distributed.ReduceOp.SUM)
    return x


@torch.no_grad()
def sinkhorn_knopp(teacher_out: torch.Tensor, temp: float, iterations: int = 3) -> torch.Tensor:
    """DINOv2's teacher targets (dino_clstoken_loss.py): exp(logits / temp) scaled alternately so that
    every prototype gets 1/K of the mass and every sample 1/B (B: the samples of all processes); returned
    per sample, so each row sums to 1 and each column to about B/K (exactly, once converged)."""
    logits = teacher_out.float() / temp
    top = logits.max()  # a common shift keeps exp finite and changes nothing after normalising
    if _distributed():
        _all_reduce(top, torch.distributed.ReduceOp.MAX)
    q = torch.exp(logits - top).t()  # (K, B)
    prototypes = q.shape[0]
    samples = float(_all_reduce(torch.tensor(float(q.shape[1]), device=q.device)))  # ranks' counts may differ
    q /= _all_reduce(q.sum())
    for _ in range(iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True)) * prototypes
        q /= q.sum(dim=0, keepdim=True) * samples
    return (q * samples).t()


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
        self.head = self.new_head(cfg.out_dim)
        self.add_heads()
        self.teacher = frozen_copy(self.online())
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        steps, per_epoch = budget.total_steps, budget.steps_per_epoch
        self.warmup_teacher_temp_steps = min(
            int(cfg.warmup_teacher_temp_epochs * per_epoch), int(0.3 * steps)
        )
        self.teacher_temps = self.temperatures(cfg.warmup_teacher_temp, cfg.teacher_temp)
        self.momentum = cosine(cfg.momentum_teacher, 1.0, steps)
        # One epoch of 100 in the paper; capped at 10% of shorter runs, like the warm-ups.
        self.freeze_last_layer_steps = min(int(cfg.freeze_last_layer_epochs * per_epoch), int(0.1 * steps))
        self.resolved = {
            "warmup_teacher_temp_steps": self.warmup_teacher_temp_steps,
            "freeze_last_layer_steps": self.freeze_last_layer_steps,
        }

    def new_head(self, out_dim: int) -> DINOHead:
        c = self.cfg
        return DINOHead(
            self.encoder.num_features, out_dim, c.hidden_dim, c.bottleneck_dim, c.head_bn, c.norm_last_layer
        )

    def add_heads(self) -> None:
        """Hook: heads beyond `self.head`, made before the teacher copies `online()` (iBOT's patch head)."""

    def online(self) -> nn.Module:
        """The student modules the EMA teacher mirrors."""
        return nn.Sequential(self.encoder, self.head)

    def heads(self) -> list[DINOHead]:
        return [self.head]

    def temperatures(self, warmup: float, final: float) -> np.ndarray:
        """A teacher temperature per step: a linear warm-up, then constant (without sharpening: the
        student's)."""
        if not self.cfg.sharpening:
            warmup = final = self.cfg.student_temp
        return linear_then_constant(warmup, final, self.warmup_teacher_temp_steps, self.budget.total_steps)

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
        h = self.student_embeddings(self.encoder(globals_), views)
        temp = float(self.teacher_temps[step])
        probs = self.teacher_probs(teacher_out, self.center, temp)
        loss = cross_view_loss(self.head(h), probs, len(views), self.cfg.student_temp)
        logs = self.logs(step, probs, h[: globals_.shape[0]])
        return loss + self.koleo(h[: globals_.shape[0]], logs), logs

    def student_embeddings(self, global_embeddings: torch.Tensor, views: list[torch.Tensor]) -> torch.Tensor:
        """The global crops' embeddings, then the local crops' (they share a size: one forward pass)."""
        if len(views) == 2:
            return global_embeddings
        return torch.cat([global_embeddings, self.encoder(torch.cat(views[2:]))])

    def teacher_probs(self, teacher_out: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
        """The teacher's targets: Sinkhorn-Knopp, or the centred softmax (the centre then moves on)."""
        if self.cfg.sinkhorn_knopp:
            return sinkhorn_knopp(teacher_out, temp)
        probs = F.softmax((teacher_out - center) / temp, dim=-1)
        if self.cfg.centering:
            self.update_center(teacher_out, center)
        return probs

    def koleo(self, global_embeddings: torch.Tensor, logs: dict) -> torch.Tensor | float:
        """`koleo_weight` x the KoLeo loss of each global crop's embeddings, summed over the crops."""
        if not self.cfg.koleo_weight:
            return 0.0
        value = sum(koleo_loss(crop) for crop in global_embeddings.chunk(2))
        logs["koleo"] = float(value.detach())
        return self.cfg.koleo_weight * value

    def logs(self, step: int, probs: torch.Tensor, global_embeddings: torch.Tensor) -> dict[str, float]:
        entropy = float(-(probs * probs.clamp_min(1e-12).log()).sum(-1).mean())
        return {
            "teacher_entropy": entropy,
            "teacher_entropy_max": math.log(probs.shape[-1]),
            "teacher_temp": float(self.teacher_temps[step]),
            "momentum": float(self.momentum[step]),
            "feature_std": feature_std(global_embeddings),
        }

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor, center: torch.Tensor | None = None) -> None:
        """centre <- m x centre + (1 - m) x the batch mean of `teacher_out` (over all processes)."""
        center = self.center if center is None else center
        batch_center = _all_reduce(teacher_out.float().mean(dim=0, keepdim=True))
        if _distributed():
            batch_center /= torch.distributed.get_world_size()
        m = self.cfg.center_momentum
        center.mul_(m).add_(batch_center, alpha=1 - m)

    def before_optimizer_step(self, step):
        if step < self.freeze_last_layer_steps:
            for head in self.heads():
                for p in head.last_layer.parameters():
                    p.grad = None

    def after_optimizer_step(self, step):
        m = float(self.momentum[min(step, len(self.momentum) - 1)])
        ema_update(self.teacher, self.online(), m)
