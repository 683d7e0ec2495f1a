"""Fine-tuning (FT): keep training on the retain set only, so the forget set fades by catastrophic
forgetting (Warnecke et al. 2023, in the setting of Jia et al. 2023)."""

from __future__ import annotations

from dataclasses import dataclass

from cvfm.unlearn.methods.base import UnlearnConfig, UnlearnMethod, cross_entropy


@dataclass
class FinetuneConfig(UnlearnConfig):
    lr: float = 0.01  # Unlearn-Saliency FT (Jia et al. 2023): unlearn_lr 0.01 at batch 256, 10 epochs


class Finetune(UnlearnMethod):
    name = "finetune"
    config_cls = FinetuneConfig
    uses = ("retain",)

    def passes(self, epoch):
        return ["retain"]

    def loss(self, model, batch, epoch):
        ce = cross_entropy(model, batch["retain"])
        return ce, {"ce_retain": float(ce.detach())}
