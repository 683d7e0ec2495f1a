"""iBOT (Zhou et al. 2022): DINO on the [CLS] token plus masked image modelling with an online tokenizer.
The student sees the global crops with blocks of patches replaced by a learned mask token; the EMA teacher
sees them whole, and its patch head (the online tokenizer) gives each masked patch a target distribution,
centred with a centre of its own.

Defaults are bytedance/ibot's: main_ibot.py (patch temperature 0.04 -> 0.07, loss weights 1 and 1, the
centre momentum, EMA, weight decay, clipping and last-layer freezing of DINO) with the README's ViT-S/16
recipe (--shared_head true, 10 local crops, crop scales (0.25, 1) and (0.05, 0.25), --pred_ratio 0 0.3
--pred_ratio_var 0 0.2: half the images masked, each at a ratio drawn from U(0.1, 0.5), in blocks as
loader.py). Sizes that depend on the data (prototypes, head width, local crop size, the [CLS] teacher
temperature) are resolved as `dino` resolves them and recorded in run.json; the patch head has as many
prototypes as the [CLS] head. `shared_head=false` gives the patch tokens a head of their own (DINOv2's
separate head: iBOT's own shares the MLP and splits only the last layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cvfm.errors import UsageError
from cvfm.methods.base import Budget, require_patch_masking
from cvfm.methods.dino import DINO, DINOConfig, cross_view_loss
from cvfm.models.masking import block_mask


@dataclass
class IBOTConfig(DINOConfig):
    local_crops: int = 10
    global_scale: tuple = (0.25, 1.0)
    local_scale: tuple = (0.05, 0.25)
    patch_out_dim: int | None = None  # auto: out_dim (required when the head is shared)
    shared_head: bool = True  # one head for [CLS] and patch tokens; false: a separate patch head
    mask_probability: float = 0.5  # the share of global crops that are masked
    mask_ratio: tuple = (0.1, 0.5)  # a masked crop's share of masked patches, drawn uniformly
    warmup_teacher_patch_temp: float = 0.04
    teacher_patch_temp: float | None = 0.07  # None: the [CLS] teacher temperature
    cls_loss_weight: float = 1.0  # main_ibot.py's lambda1
    patch_loss_weight: float = 1.0  # lambda2

    def resolve(self, encoder, budget: Budget) -> IBOTConfig:
        super().resolve(encoder, budget)
        self.patch_out_dim = self.patch_out_dim or self.out_dim
        self.teacher_patch_temp = self.teacher_patch_temp or self.teacher_temp
        lo, hi = self.mask_ratio
        if not 0 <= lo <= hi < 1:
            raise UsageError(f"option mask_ratio={lo},{hi}: needs 0 <= min <= max < 1")
        if not 0 <= self.mask_probability <= 1:
            raise UsageError(f"option mask_probability={self.mask_probability}: must be between 0 and 1")
        if self.shared_head and self.patch_out_dim != self.out_dim:
            raise UsageError(
                f"option patch_out_dim={self.patch_out_dim} differs from out_dim={self.out_dim}: "
                "pass --opt shared_head=false to give the patch tokens a head of their own"
            )
        return self


def masked_patch_loss(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, mask: torch.Tensor, student_temp: float
) -> torch.Tensor:
    """iBOT's patch loss: the cross-entropy of the teacher's targets against the student on each masked patch
    (the rows of `student_logits` and `teacher_probs`, in the order of `mask`'s True entries), averaged over
    each image's masked patches, then over all B images of `mask` (B, N) (an unmasked image counts 0)."""
    ce = -(teacher_probs.detach() * torch.log_softmax(student_logits / student_temp, dim=-1)).sum(-1)
    per_image = mask.sum(1, keepdim=True).clamp_min(1).expand_as(mask)[mask]
    return (ce / per_image).sum() / mask.shape[0]


class IBOT(DINO):
    default_model = "cvfm/tiny-vit"
    summary_keys = ("feature_std", "teacher_entropy", "patch_loss")
    center_all_patches = True  # main_ibot.py centres the patch head on every patch; DINOv2 on masked ones

    def __init__(self, encoder, cfg: IBOTConfig, budget: Budget):
        require_patch_masking(encoder, self.method_name(), drop=False)
        super().__init__(encoder, cfg, budget)
        self.register_buffer("patch_center", torch.zeros(1, cfg.patch_out_dim))
        self.teacher_patch_temps = self.temperatures(cfg.warmup_teacher_patch_temp, cfg.teacher_patch_temp)

    @classmethod
    def method_name(cls) -> str:
        return cls.__name__.lower()

    def add_heads(self) -> None:
        self.patch_head = None if self.cfg.shared_head else self.new_head(self.cfg.patch_out_dim)

    def online(self) -> nn.Module:
        heads = {"head": self.head} | ({"patch_head": self.patch_head} if self.patch_head else {})
        return nn.ModuleDict({"encoder": self.encoder, **heads})

    def heads(self) -> list:
        return [self.head] + ([self.patch_head] if self.patch_head else [])

    def sample_masks(self, n: int, grid: tuple[int, int]) -> torch.Tensor:
        """(n, rows x cols) bool: each crop masked with `mask_probability`, at a ratio drawn from
        `mask_ratio`, in blocks of at least (min(rows, cols) // 3)^2 patches (loader.py's ImageFolderMask)."""
        (lo, hi), (rows, cols) = self.cfg.mask_ratio, grid
        masks = torch.zeros(n, rows * cols, dtype=torch.bool)
        for i in range(n):
            if float(torch.rand(())) < self.cfg.mask_probability:
                count = int((lo + (hi - lo) * float(torch.rand(()))) * rows * cols)
                masks[i] = block_mask(grid, count, min_block=(min(grid) // 3) ** 2).flatten()
        return masks

    def forward(self, batch, step):
        views, c = batch["image"], self.cfg
        step = min(step, len(self.teacher_temps) - 1)
        globals_ = torch.cat(views[:2])
        mask = self.sample_masks(globals_.shape[0], self.encoder.token_grid(*globals_.shape[-2:]))
        mask = mask.to(globals_.device)
        teacher_patch_head = self.teacher["patch_head"] if self.patch_head else self.teacher["head"]
        with torch.no_grad():
            t = self.teacher["encoder"].encode(globals_)
            teacher_cls = self.teacher["head"](t.pooled)
            tokens = t.patch_tokens if self.center_all_patches else t.patch_tokens[mask]
            teacher_patches = teacher_patch_head(tokens.flatten(0, -2))
        s = self.encoder.encode(globals_, mask)
        h = self.student_embeddings(s.pooled, views)
        cls_probs = self.teacher_probs(teacher_cls, self.center, float(self.teacher_temps[step]))
        cls_loss = cross_view_loss(self.head(h), cls_probs, len(views), c.student_temp)
        patch_temp = float(self.teacher_patch_temps[step])
        patch_loss = self.patch_loss(s.patch_tokens, teacher_patches, mask, patch_temp)
        logs = self.logs(step, cls_probs, s.pooled) | {
            "cls_loss": float(cls_loss.detach()),
            "patch_loss": float(patch_loss.detach()),
            "masked_share": float(mask.float().mean()),
            "teacher_patch_temp": patch_temp,
        }
        loss = c.cls_loss_weight * cls_loss + c.patch_loss_weight * patch_loss
        return loss + self.koleo(s.pooled, logs), logs

    def patch_loss(
        self, student_tokens: torch.Tensor, teacher_patches: torch.Tensor, mask: torch.Tensor, temp: float
    ) -> torch.Tensor:
        """The masked patches' loss: the student's patch head on its masked tokens against the teacher's
        targets (`teacher_patches`: its patch head's output on every patch, or on the masked ones)."""
        if not mask.any():  # no crop masked in this batch: nothing to predict, no centre to move
            return student_tokens.sum() * 0.0
        probs = self.teacher_probs(teacher_patches, self.patch_center, temp)
        if self.center_all_patches:
            probs = probs[mask.flatten()]
        logits = (self.patch_head or self.head)(student_tokens[mask])
        return masked_patch_loss(logits, probs, mask, self.cfg.student_temp)
