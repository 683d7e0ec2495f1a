"""Distillation losses, each a plain function of tensors (checked against hand computations in
tests/test_distill.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cvfm.models.encoder import resize_tokens


def feature_distance(student: torch.Tensor, teacher: torch.Tensor, distance: str) -> torch.Tensor:
    """Mean over rows (..., D) of 1 - cos(student, teacher), or the mean squared error."""
    if distance == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    return F.mse_loss(student.float(), teacher.float())


def logit_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)) x T^2, averaged over the batch (Hinton et al.)."""
    t = temperature
    target = F.log_softmax(teacher.float() / t, dim=-1)
    log_p = F.log_softmax(student.float() / t, dim=-1)
    return F.kl_div(log_p, target, reduction="batchmean", log_target=True) * t * t


def dino_distill(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the student's head distribution against the teacher head's centred, sharpened one
    (DINO's loss with a frozen teacher, as DINOv2's distillation); returns (loss, teacher probabilities)."""
    q = F.softmax((teacher.float() - center) / teacher_temp, dim=-1)
    loss = torch.sum(-q * F.log_softmax(student.float() / student_temp, dim=-1), dim=-1).mean()
    return loss, q


def embedding_mse(tokens: torch.Tensor, grid: tuple[int, int], embedding: torch.Tensor) -> torch.Tensor:
    """MobileSAM's decoupled distillation: the student's (projected) tokens on `grid`, resized to the SAM
    image embedding's (B, C, h, w) grid, against it by mean squared error."""
    student = resize_tokens(tokens, grid, tuple(embedding.shape[-2:]))
    return F.mse_loss(student, embedding.float().flatten(2).transpose(1, 2))
