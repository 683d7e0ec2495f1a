"""NegGrad+ (Kurmanji et al. 2023, "Towards Unbounded Machine Unlearning"): descent on the retain set and
ascent on the forget set in one loss, `beta * CE(retain) - (1 - beta) * CE(forget)`, each retain batch
paired with a forget batch (the forget set cycled, as repdistiller's `train_negrad` in meghdadk/SCRUB)."""

from __future__ import annotations

from dataclasses import dataclass

from cvfm.unlearn.methods.base import UnlearnConfig, UnlearnMethod, check_option, cross_entropy


@dataclass
class NegGradPlusConfig(UnlearnConfig):
    lr: float = 0.01  # Unlearn-Saliency's unlearn_lr at batch 256
    # Kurmanji et al. 2023 tune beta (their `alpha`) per setting; 0.999 keeps the ascent term a small nudge
    beta: float = 0.999

    def __post_init__(self):
        super().__post_init__()
        check_option(0 <= self.beta <= 1, "beta", self.beta, "in [0, 1]")


class NegGradPlus(UnlearnMethod):
    name = "neggrad+"
    config_cls = NegGradPlusConfig
    advice = "lower the learning rate (--opt lr=...) or raise beta (--opt beta=...): the ascent diverged"

    def passes(self, epoch):
        return ["retain+forget"]

    def loss(self, model, batch, epoch):
        beta = self.cfg.beta
        retain, forget = cross_entropy(model, batch["retain"]), cross_entropy(model, batch["forget"])
        loss = beta * retain - (1 - beta) * forget
        return loss, {"ce_retain": float(retain.detach()), "ce_forget": float(forget.detach())}
