"""Supervised fine-tuning: cross-entropy on the data's labels, training the whole `Classifier`.

These are the original models that machine unlearning starts from, trained with the recipe of the
unlearning papers (Jia et al. 2023, "Model Sparsity Can Simplify Machine Unlearning"; Fan et al. 2024,
SalUn): SGD with momentum 0.9, lr 0.1 at batch 256 (scaled linearly with the batch), weight decay 5e-4 on
every parameter, no label smoothing; cvfm decays the lr with a cosine after the trainer's warm-up (the
papers step it down). Augmentation: a RandomResizedCrop of area (0.8, 1) at the encoder's input size and a
horizontal flip (`train_transform`), which the unlearning loop reuses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from cvfm.data.views import MultiView, Preprocess
from cvfm.methods.base import Method, need


@dataclass
class SupervisedConfig:
    augment: bool = True  # false: the encoder's evaluation transform
    min_scale: float = 0.8  # RandomResizedCrop area
    momentum: float = 0.9  # Jia et al. 2023 / SalUn
    weight_decay: float = 5e-4  # Jia et al. 2023 / SalUn
    label_smoothing: float = 0.0


def train_transform(preprocess: Preprocess, augment: bool, min_scale: float = 0.8) -> T.Compose:
    """The classifier's training transform: RandomResizedCrop(size, scale=(min_scale, 1)) + horizontal
    flip + normalisation; `augment=False` gives the deterministic evaluation transform."""
    if not augment:
        return preprocess.transform()
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(
                preprocess.size,
                scale=(min_scale, 1.0),
                interpolation=InterpolationMode(preprocess.interpolation),
                antialias=True,
            ),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(preprocess.mean, preprocess.std),
        ]
    )


class Supervised(Method):
    """`self.encoder` is a `Classifier`; `forward` is its cross-entropy on the batch's labels."""

    model_kind = "classifier"
    export_dir = "classifier"
    needs_labels = True
    base_lr = 0.1  # at batch 256, SGD (Jia et al. 2023 / SalUn)
    summary_keys = ("accuracy",)

    def __init__(self, encoder, cfg: SupervisedConfig, budget):
        super().__init__(encoder, cfg, budget)
        self.weight_decay = (cfg.weight_decay, cfg.weight_decay)

    def views(self) -> MultiView:
        return MultiView([train_transform(self.encoder.preprocess, self.cfg.augment, self.cfg.min_scale)])

    def forward(self, batch, step):
        labels = need(batch, "label", "supervised training needs the batch's labels")
        logits = self.encoder(batch["image"][0])
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        accuracy = float((logits.detach().argmax(1) == labels).float().mean())
        return loss, {"accuracy": accuracy}

    def peak_lr(self, batch_size: int) -> float:
        """Linear scaling for SGD (Goyal et al. 2017): 0.1 x batch / 256."""
        return self.base_lr * batch_size / 256

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(
            self.param_groups(), lr=lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay
        )

    def param_groups(self) -> list[dict]:
        """One group: the papers' code decays every parameter (`SGD(model.parameters(), ...)`)."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "apply_wd": True}]
