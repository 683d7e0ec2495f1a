"""SAM's training losses (Kirillov et al. 2023, appendix A, "Losses"): focal and dice loss on the masks in
a 20:1 ratio, and the mean squared error between the IoU head's prediction and each mask's true IoU; with
several candidate masks for one prompt, only the one of lowest mask loss is back-propagated.

Focal loss as DETR / Mask2Former use it (torchvision's `sigmoid_focal_loss`, alpha 0.25, gamma 2), averaged
over the pixels; dice loss 1 - (2 |p t| + 1) / (|p| + |t| + 1) on the sigmoid probabilities, as SAM 2's
training code. Masks are compared at the decoder's low resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import sigmoid_focal_loss

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


def focal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(..., h, w) logits and 0/1 targets: the focal loss of each mask, averaged over its pixels."""
    loss = sigmoid_focal_loss(logits, target.to(logits.dtype), FOCAL_ALPHA, FOCAL_GAMMA, reduction="none")
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(..., h, w) logits and 0/1 targets: 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1) per mask."""
    p, t = logits.sigmoid().flatten(-2), target.to(logits.dtype).flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of each mask (logits > 0) with its boolean target; 1 when both are empty."""
    pred, t = (logits > 0).flatten(-2), target.bool().flatten(-2)
    inter, union = (pred & t).sum(-1).float(), (pred | t).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@dataclass(frozen=True)
class LossWeights:
    focal: float = 20.0  # SAM: focal to dice 20:1, the IoU term added with weight 1
    dice: float = 1.0
    iou: float = 1.0


def prompt_loss(
    logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor, weights: LossWeights = LossWeights()
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of each of P prompts from its M candidate masks: (P, M, h, w) logits, (P, M) predicted IoU
    and (P, h, w) boolean targets. Returns the (P,) losses (the candidate of lowest focal + dice loss, plus
    the IoU head's error averaged over all M candidates) and (P,) parts: "focal", "dice", "iou_mse" and
    "iou" (the true IoU of each prompt's candidate with the highest predicted IoU, the one a user gets)."""
    target = target[:, None].expand_as(logits)
    focal, dice = focal_loss(logits, target), dice_loss(logits, target)
    mask_loss = weights.focal * focal + weights.dice * dice
    best = mask_loss.argmin(1, keepdim=True)
    true_iou = mask_iou(logits, target)
    iou_mse = ((iou_pred - true_iou) ** 2).mean(1)
    loss = mask_loss.gather(1, best)[:, 0] + weights.iou * iou_mse
    chosen = iou_pred.argmax(1, keepdim=True)
    parts = {
        "focal": focal.gather(1, best)[:, 0],
        "dice": dice.gather(1, best)[:, 0],
        "iou_mse": iou_mse,
        "iou": true_iou.gather(1, chosen)[:, 0],
    }
    return loss, parts
