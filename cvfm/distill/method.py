"""Distillation as a `Method` of the shared loop: the student (`encoder`, exported) learns from the
`frozen_teacher` (never trained, checkpointed or exported) by the chosen losses, summed."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from cvfm.data.preprocess import adapt
from cvfm.data.views import MultiView, crop_flip
from cvfm.distill.cache import TeacherCache
from cvfm.distill.config import DistillConfig
from cvfm.distill.losses import dino_distill, embedding_mse, feature_distance, logit_kd, resize_tokens
from cvfm.distill.standardise import Standardise
from cvfm.distill.teacher import SamTeacher, Teacher
from cvfm.methods.base import Budget, Method, ema_update, feature_std, frozen_copy
from cvfm.methods.dino import DINOHead
from cvfm.models.backbone_sam import WHY_NOT, BackboneSegmenter, check_feature_map
from cvfm.models.encoder import token_grid
from cvfm.runtime.files import save_atomically
from cvfm.runtime.progress import log
from cvfm.runtime.schedules import cosine

STUDENT_TEMP, CENTER_MOMENTUM, EMA_MOMENTUM = 0.1, 0.9, 0.996  # DINO's


def projector(student_dim: int, teacher_dim: int) -> nn.Linear:
    """A learned linear map of the student's features to the teacher's width (not exported), also when the
    widths agree: FD and MobileSAM project on the student side, and a student's features after a ReLU could
    not reach standardised (centred) targets without one."""
    return nn.Linear(student_dim, teacher_dim)


class Distill(Method):
    """Feature distillation (pooled embedding and patch tokens, against the teacher's standardised outputs:
    see `cvfm.distill.standardise`), DINO-style distillation (the teacher head's
    distribution; the student's EMA is the exported model, as in DINOv2) and logit distillation.

    With "dino" the online student is `student` and `encoder` (exported, evaluated) its EMA; otherwise
    `encoder` is the student itself."""

    summary_keys = ("feature_std",)

    def __init__(
        self,
        encoder,
        cfg: DistillConfig,
        budget: Budget,
        teacher: Teacher | SamTeacher,
        cache: TeacherCache | None = None,
    ):
        super().__init__(encoder, cfg, budget, frozen_teacher=teacher)
        self.cache = cache
        width = teacher.width
        if "sam-embedding" in cfg.losses:  # MobileSAM's neck role: the student's tokens to SAM's channels
            check_feature_map(encoder)
            self.token_proj = projector(encoder.num_features, width)
        if "feature" in cfg.losses:
            self.pooled_proj = projector(encoder.num_features, width)
            self.token_proj = projector(encoder.num_features, width)
            self.pooled_norm = Standardise(width) if cfg.standardise else nn.Identity()
            self.token_norm = Standardise(width) if cfg.standardise else nn.Identity()
        if "logit" in cfg.losses:
            self.logit_head = nn.Linear(encoder.num_features, len(teacher.classes))
        if "dino" in cfg.losses:
            h = teacher.dino_head
            dims = (h.last_layer.out_features, h.mlp[0].out_features, h.mlp[-1].out_features)
            self.dino_head = DINOHead(
                encoder.num_features, *dims, any(isinstance(m, nn.BatchNorm1d) for m in h.mlp)
            )
            self.register_buffer("center", torch.zeros(1, dims[0]))
            self.student = encoder
            self.encoder = frozen_copy(encoder)  # the EMA, exported
            self.momentum = cosine(EMA_MOMENTUM, 1.0, budget.total_steps)
        self.resolved = {"teacher_width": width, "student_width": encoder.num_features}

    @property
    def online(self) -> nn.Module:
        """The encoder the optimizer trains."""
        return self.student if "dino" in self.cfg.losses else self.encoder

    def views(self) -> MultiView:
        pre = self.frozen_teacher.views  # the student's preprocessing; a SAM teacher's own
        return crop_flip(pre) if self.cfg.augment else MultiView([pre.transform()])

    def forward(self, batch, step):
        x = batch["image"][0]
        teacher: Teacher = self.frozen_teacher
        t = self.cache(teacher, x) if self.cache is not None else teacher(x)
        x = adapt(x, teacher.views, self.online.preprocess)  # SAM's views to the student's input
        out = self.online.encode(x)
        losses: dict[str, torch.Tensor] = {}
        if "feature" in self.cfg.losses:
            pooled = self.pooled_norm(t.pooled)
            losses["pooled"] = feature_distance(self.pooled_proj(out.pooled), pooled, self.cfg.distance)
            if self.cfg.token_weight and t.tokens is not None and out.patch_tokens is not None:
                grid = token_grid(self.online, x.shape[-2:], out.patch_tokens.shape[1])
                target = resize_tokens(self.token_norm(t.tokens), t.grid, grid)
                tokens = feature_distance(self.token_proj(out.patch_tokens), target, self.cfg.distance)
                losses["tokens"] = self.cfg.token_weight * tokens
        if "sam-embedding" in self.cfg.losses:
            grid = token_grid(self.online, x.shape[-2:], out.patch_tokens.shape[1])
            losses["sam_embedding"] = embedding_mse(self.token_proj(out.patch_tokens), grid, t.embedding)
        if "logit" in self.cfg.losses:
            losses["logit"] = logit_kd(self.logit_head(out.pooled), t.logits, self.cfg.temperature)
        if "dino" in self.cfg.losses:
            temp = teacher.dino_head.teacher_temp
            losses["dino"], _ = dino_distill(
                self.dino_head(out.pooled), t.dino, self.center, STUDENT_TEMP, temp
            )
            self._update_center(t.dino)
        logs = {f"loss_{k}": float(v.detach()) for k, v in losses.items()}
        logs["feature_std"] = feature_std(out.pooled)
        if "feature" in self.cfg.losses:
            logs["teacher_cosine"] = _pooled_cosine(self.pooled_proj, out.pooled, pooled)
        return sum(losses.values()), logs

    def after_training(self, folder: Path, source) -> None:
        """With a SAM teacher: segmenter/, the student and its projection (the neck) in place of the teacher's
        image encoder, beside the teacher's prompt encoder and mask decoder (`BackboneSegmenter`)."""
        if "sam-embedding" not in self.cfg.losses:
            return
        sam = self.frozen_teacher.segmenter
        if sam.family != "sam":
            log(f"the run has no segmenter/: {WHY_NOT[sam.family]}; backbone/ is the student")
            return
        save_atomically(BackboneSegmenter.attach(sam, self.encoder, self.token_proj), folder / "segmenter")

    @torch.no_grad()
    def _update_center(self, teacher_out: torch.Tensor) -> None:
        batch_center = teacher_out.mean(dim=0, keepdim=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
            batch_center /= torch.distributed.get_world_size()
        self.center.mul_(CENTER_MOMENTUM).add_(batch_center, alpha=1 - CENTER_MOMENTUM)

    @torch.no_grad()
    def after_optimizer_step(self, step):
        if "dino" not in self.cfg.losses:
            return
        ema_update(self.encoder, self.student, float(self.momentum[min(step, len(self.momentum) - 1)]))
        for ema, online in zip(self.encoder.buffers(), self.student.buffers(), strict=True):
            ema.copy_(online)  # BatchNorm statistics: the online student's


@torch.no_grad()
def _pooled_cosine(proj: nn.Module, student: torch.Tensor, teacher: torch.Tensor) -> float:
    """Mean cosine of the projected student embedding and the teacher's target (standardised unless
    --no-standardise): how close distillation got."""
    return float(torch.nn.functional.cosine_similarity(proj(student).float(), teacher, dim=-1).mean())
