"""l1-sparse unlearning (Jia et al. 2023, "Model Sparsity Can Simplify Machine Unlearning", FT_l1): fine-tune
on the retain set with an l1 penalty `gamma_t * ||theta||_1` that decays linearly over the epochs,
`gamma_t = gamma * (1 - epoch / epochs)` (Unlearn-Saliency unlearn/FT.py), sparsifying the weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cvfm.unlearn.methods.base import UnlearnConfig, UnlearnMethod, check_option, cross_entropy, trainable


@dataclass
class L1SparseConfig(UnlearnConfig):
    lr: float = 0.01  # Jia et al. 2023: unlearn_lr 0.01 at batch 256, 10 epochs
    gamma: float = 5e-4  # their README's FT_l1 setting (--alpha 5e-4)

    def __post_init__(self):
        super().__post_init__()
        check_option(self.gamma >= 0, "gamma", self.gamma, "at least 0")


class L1Sparse(UnlearnMethod):
    name = "l1-sparse"
    config_cls = L1SparseConfig
    uses = ("retain",)

    def prepare(self, model, forget, *, epochs, seed, num_classes):
        self.epochs = epochs

    def gamma_at(self, epoch: int) -> float:
        """The penalty weight of `epoch`: gamma at the first epoch, falling linearly towards 0."""
        return self.cfg.gamma * (1 - epoch / self.epochs)

    def passes(self, epoch):
        return ["retain"]

    def loss(self, model, batch, epoch):
        ce = cross_entropy(model, batch["retain"])
        l1 = torch.stack([p.abs().sum() for _, p in trainable(model)]).sum()
        loss = ce + self.gamma_at(epoch) * l1
        return loss, {"ce_retain": float(ce.detach()), "l1": float(l1.detach())}
