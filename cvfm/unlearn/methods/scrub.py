"""SCRUB (Kurmanji et al. 2023, NeurIPS, "Towards Unbounded Machine Unlearning"): the model is a student of a
frozen copy of itself. Each epoch, while epoch < msteps, a max pass over the forget set pushes the
student away from the teacher (loss `-KL(teacher || student)`); then a min pass over the retain set keeps
it close (`gamma * CE + alpha * KL`). KL is repdistiller's DistillKL: at temperature T, scaled by T^2.

Epochs. SCRUB does not follow the 10-of-182 rule of the other methods: its published run is 3 epochs,
the first 2 with a max pass. `epochs=None` resolves to `max(msteps + 1, round(original_epochs * 3 / 182))`,
so at least one min-only epoch follows the max steps (3 for the defaults, and for any original run of up
to ~270 epochs), and longer originals get proportionally more. With an explicit `epochs` below
`msteps + 1` every epoch has a max pass (`msteps` is capped at `epochs`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cvfm.unlearn.methods.base import PAPER_TRAINING_EPOCHS, UnlearnConfig, UnlearnMethod, check_option


@dataclass
class ScrubConfig(UnlearnConfig):
    # meghdadk/SCRUB defaults: sgda_learning_rate 5e-4 at sgda_batch_size 128, kd_T 4, gamma 0.99,
    # alpha 0.001, msteps 2, sgda_epochs 3, SGD momentum 0.9, weight decay 5e-4
    lr: float = 5e-4
    temperature: float = 4.0
    gamma: float = 0.99
    alpha: float = 0.001
    msteps: int = 2

    def __post_init__(self):
        super().__post_init__()
        check_option(self.temperature > 0, "temperature", self.temperature, "a positive number")
        check_option(self.gamma >= 0, "gamma", self.gamma, "at least 0")
        check_option(self.alpha >= 0, "alpha", self.alpha, "at least 0")
        check_option(self.msteps >= 0, "msteps", self.msteps, "at least 0")


def distill_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the softened distributions, summed over classes, averaged over the batch,
    times T^2 (repdistiller's DistillKL)."""
    log_p = F.log_softmax(student / temperature, dim=1)
    q = F.softmax(teacher / temperature, dim=1)
    return F.kl_div(log_p, q, reduction="sum") * temperature**2 / student.shape[0]


class Scrub(UnlearnMethod):
    name = "scrub"
    config_cls = ScrubConfig
    paper_epochs = 3
    reference_batch = 128  # SCRUB's sgda_batch_size
    advice = "lower the learning rate (--opt lr=...) or the max steps (--opt msteps=...)"

    def resolve_epochs(self, original_epochs):
        if self.cfg.epochs is not None:
            return self.cfg.epochs
        if original_epochs is None:
            return max(self.cfg.msteps + 1, self.paper_epochs)
        return max(self.cfg.msteps + 1, round(original_epochs * self.paper_epochs / PAPER_TRAINING_EPOCHS))

    def prepare(self, model, forget, *, epochs, seed, num_classes):
        self.msteps = min(self.cfg.msteps, epochs)
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)

    def passes(self, epoch):
        return ["forget", "retain"] if epoch < self.msteps else ["retain"]

    def loss(self, model, batch, epoch):
        name = "forget" if "forget" in batch else "retain"
        images = batch[name]["image"]
        logits = model(images)
        with torch.no_grad():
            target = self.teacher(images)
        kl = distill_kl(logits, target, self.cfg.temperature)
        if name == "forget":
            return -kl, {"kl_forget": float(kl.detach())}
        ce = F.cross_entropy(logits, batch["retain"]["label"])
        loss = self.cfg.gamma * ce + self.cfg.alpha * kl
        return loss, {"ce_retain": float(ce.detach()), "kl_retain": float(kl.detach())}
