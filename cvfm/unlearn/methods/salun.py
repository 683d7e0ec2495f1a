"""SalUn (Fan et al. 2024, ICLR, "SalUn: Empowering Machine Unlearning via Gradient-based Weight Saliency"):
random-label unlearning restricted to the salient weights.

The saliency of a weight is the magnitude of the forget-set cross-entropy gradient at the original
weights, summed over all forget batches; the top `threshold` fraction, ranked over all trainable
parameters together, is salient (the paper's definition: the largest magnitudes). Training is then
random labelling (`random-label`) with each gradient multiplied by the mask before the step, and the
masked-out weights and their momentum put back after it, so they stay exactly at their original values
(weight decay would otherwise move them; OPTML-Group/Unlearn-Saliency `_restore_masked_params`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cvfm.data.sources import DataError
from cvfm.unlearn.methods.base import check_option, trainable
from cvfm.unlearn.methods.random_label import RandomLabel, RandomLabelConfig


@dataclass
class SalUnConfig(RandomLabelConfig):
    lr: float = 0.013  # Fan et al. 2024: their CIFAR-10 example (10% forgetting) at batch 256, 10 epochs
    threshold: float = 0.5  # the salient fraction of weights (their CIFAR-10 example: hard_0.5)

    def __post_init__(self):
        super().__post_init__()
        check_option(0 < self.threshold <= 1, "threshold", self.threshold, "in (0, 1]")


def top_fraction_mask(scores: list[torch.Tensor], fraction: float) -> list[torch.Tensor]:
    """Boolean masks, one per tensor, that are True on exactly `int(n * fraction)` entries of the `n`
    together: those with the largest scores, ranked over all tensors at once."""
    flat = torch.cat([s.flatten() for s in scores])
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[torch.topk(flat, int(flat.numel() * fraction), sorted=False).indices] = True
    return [m.view_as(s) for m, s in zip(keep.split([s.numel() for s in scores]), scores, strict=True)]


class SalUn(RandomLabel):
    name = "salun"
    config_cls = SalUnConfig

    def prepare(self, model, forget, *, epochs, seed, num_classes):
        super().prepare(model, forget, epochs=epochs, seed=seed, num_classes=num_classes)
        self.params = [p for _, p in trainable(model)]
        self.mask = top_fraction_mask(saliency(model, forget, self.params), self.cfg.threshold)
        self.original = [p.detach().clone() for p in self.params]

    @property
    def masked_fraction(self) -> float:
        """The share of trainable weights that SalUn updates."""
        return sum(int(m.sum()) for m in self.mask) / sum(m.numel() for m in self.mask)

    def before_step(self, model):
        for p, m in zip(self.params, self.mask, strict=True):
            if p.grad is not None:
                p.grad.masked_fill_(~m, 0)

    @torch.no_grad()
    def after_step(self, model, optimizer):
        for p, m, p0 in zip(self.params, self.mask, self.original, strict=True):
            p.copy_(torch.where(m, p, p0))
            buffer = optimizer.state.get(p, {}).get("momentum_buffer")
            if buffer is not None:
                buffer.masked_fill_(~m, 0)


def saliency(model, forget, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """|sum over forget batches of the gradient of their mean cross-entropy| at the current weights, in eval
    mode (as Unlearn-Saliency's generate_mask.py: BatchNorm statistics stay as they are)."""
    was_training = model.training
    model.eval()
    sums = [torch.zeros_like(p) for p in params]
    batches = 0
    for batch in forget:
        loss = F.cross_entropy(model(batch["image"]), batch["label"])
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for s, g in zip(sums, grads, strict=True):
            if g is not None:
                s += g
        batches += 1
    model.train(was_training)
    if batches == 0:
        raise DataError("salun: no forget image could be read, so there is no saliency to rank")
    return [s.abs_() for s in sums]
