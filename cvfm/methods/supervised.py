"""Supervised fine-tuning: cross-entropy on the data's labels, training the whole `Classifier`.

These are the original models that machine unlearning starts from, trained with the recipe of the
unlearning papers (Jia et al. 2023, "Model Sparsity Can Simplify Machine Unlearning"; Fan et al. 2024,
SalUn): SGD with momentum 0.9, lr 0.1 at batch 256 (scaled linearly with the batch), weight decay 5e-4 on
every parameter, no label smoothing; cvfm decays the lr with a cosine after the trainer's warm-up (the
papers step it down). Augmentation: a RandomResizedCrop of area (0.8, 1) at the encoder's input size and a
horizontal flip (`train_transform`), which the unlearning loop reuses.

`optimizer="adamw"` takes instead the recipe of MAE's (and BEiT's) fine-tuning of a ViT: AdamW, lr 5e-4 x
batch / 256, weight decay 0.05 on all but biases, norms and the model's own `no_weight_decay()` (position
embeddings, class token), and, with `layer_decay` < 1, layer-wise lr decay as MAE's and BEiT's code do it:
the head at lr, block i of n (from 1) at lr x layer_decay^(n + 1 - i), the embeddings at lr x
layer_decay^(n + 1) (MAE's ViT-B: 0.65). The backbone's layers are timm's (`param_groups_layer_decay`,
one level below the head, which timm's model does not hold; it keeps the final norm with the last block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from cvfm.data.views import MultiView, Preprocess
from cvfm.errors import UsageError
from cvfm.methods.base import Method, need, split_decay

# optimizer: (peak lr at batch 256, scaled linearly with the batch; weight decay)
RECIPES = {
    "sgd": (0.1, 5e-4),  # Jia et al. 2023 / SalUn: momentum 0.9, every parameter decayed
    "adamw": (5e-4, 0.05),  # MAE's ViT-B fine-tuning (its --blr; AdamW's default betas)
}


@dataclass
class SupervisedConfig:
    augment: bool = True  # false: the encoder's evaluation transform
    min_scale: float = 0.8  # RandomResizedCrop area
    optimizer: str = "sgd"  # "sgd" | "adamw" (RECIPES)
    momentum: float = 0.9  # SGD's; Jia et al. 2023 / SalUn
    weight_decay: float | None = None  # None: the optimizer's recipe
    layer_decay: float = 1.0  # < 1: layer-wise lr decay (a timm backbone)
    label_smoothing: float = 0.0

    def __post_init__(self):
        if self.optimizer not in RECIPES:
            raise UsageError(f"optimizer must be one of {', '.join(RECIPES)}, not '{self.optimizer}'")
        if not 0.0 < self.layer_decay <= 1.0:
            raise UsageError(f"layer decay must be in (0, 1], not {self.layer_decay}")
        if self.weight_decay is None:
            self.weight_decay = RECIPES[self.optimizer][1]


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
    summary_keys = ("accuracy",)

    def __init__(self, encoder, cfg: SupervisedConfig, budget):
        super().__init__(encoder, cfg, budget)
        self.base_lr = RECIPES[cfg.optimizer][0]
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
        """Linear scaling (Goyal et al. 2017; MAE): the recipe's base lr x batch / 256."""
        return self.base_lr * batch_size / 256

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        if self.cfg.optimizer == "adamw":
            return super().make_optimizer(lr)
        return torch.optim.SGD(
            self.param_groups(), lr=lr, momentum=self.cfg.momentum, weight_decay=self.cfg.weight_decay
        )

    def param_groups(self) -> list[dict]:
        """SGD, no layer decay: one group, every parameter decayed (the papers' `SGD(model.parameters())`).
        Otherwise timm's layer-decay groups of the backbone (a group's lr is the step's x its `lr_scale`)
        and the head at lr x 1; AdamW leaves biases, norms and `no_weight_decay()` undecayed."""
        adamw = self.cfg.optimizer == "adamw"
        if not adamw and self.cfg.layer_decay == 1.0:
            return [{"params": [p for p in self.parameters() if p.requires_grad], "apply_wd": True}]
        backbone = getattr(self.encoder.encoder, "model", None)
        if not hasattr(backbone, "group_matcher"):
            if self.cfg.layer_decay < 1.0:
                raise UsageError(
                    f"layer decay needs a timm backbone (its group_matcher orders the layers); "
                    f"'{self.encoder.backbone}' has none: leave --layer-decay at 1"
                )
            return super().param_groups()
        from timm.optim import param_groups_layer_decay

        skip = backbone.no_weight_decay() if adamw and hasattr(backbone, "no_weight_decay") else ()
        groups = param_groups_layer_decay(
            backbone,
            weight_decay=self.cfg.weight_decay,
            no_weight_decay_list=skip,
            weight_decay_exclude_1d=adamw,
            layer_decay=self.cfg.layer_decay,
        )
        for group in groups:
            group["lr_scale"] *= self.cfg.layer_decay  # one level below the head
            group["apply_wd"] = group["weight_decay"] > 0
        covered = {id(p) for group in groups for p in group["params"]}
        rest = [(n, p) for n, p in self.named_parameters() if p.requires_grad and id(p) not in covered]
        decay, no_decay = split_decay(rest) if adamw else ([p for _, p in rest], [])
        for params, wd in ((decay, self.cfg.weight_decay), (no_decay, 0.0)):  # the head, outside timm's model
            if params:
                groups.append({"params": params, "lr_scale": 1.0, "weight_decay": wd, "apply_wd": wd > 0})
        return groups
