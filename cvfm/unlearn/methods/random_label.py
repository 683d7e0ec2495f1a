"""Random labelling (RL; Golatkar et al. 2020, as run by Jia et al. 2023): each epoch a pass over the forget
set against uniformly random labels, then a pass over the retain set against the true ones (the CIFAR-10
branch of OPTML-Group/Unlearn-Saliency unlearn/RL.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from cvfm.unlearn.methods.base import RandomLabels, UnlearnConfig, UnlearnMethod, cross_entropy


@dataclass
class RandomLabelConfig(UnlearnConfig):
    lr: float = 0.01  # Unlearn-Saliency's unlearn_lr at batch 256, 10 epochs


class RandomLabel(UnlearnMethod):
    name = "random-label"
    config_cls = RandomLabelConfig

    def prepare(self, model, forget, *, epochs, seed, num_classes):
        self.random_labels = RandomLabels(seed, num_classes)

    def passes(self, epoch):
        return ["forget", "retain"]

    def loss(self, model, batch, epoch):
        if "forget" in batch:
            logits = model(batch["forget"]["image"])
            ce = F.cross_entropy(logits, self.random_labels(logits))
            return ce, {"ce_random": float(ce.detach())}
        ce = cross_entropy(model, batch["retain"])
        return ce, {"ce_retain": float(ce.detach())}
