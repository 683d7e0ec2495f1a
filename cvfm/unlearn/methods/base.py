"""What every approximate unlearning method provides to the shared loop (`cvfm.unlearn.loop`).

A method is a few lines over one loop: which passes an epoch makes (over the retain set, the forget
set, or retain batches each paired with a forget batch), the loss of one batch, and optional hooks
before and after each optimizer step. Its settings are a config dataclass, overridable by name from
`--opt key=value` strings.

Epochs. The papers unlearn for 10 epochs a ResNet-18 trained for 182 (Jia et al. 2023; Fan et al. 2024),
so with `epochs=None` ("auto") a method keeps that ratio to the original model's training length:
`max(1, round(original_epochs * 10 / 182))`, or 10 when the training length is unknown. SCRUB runs its
own counts (3 epochs, the first 2 with a max pass): `Scrub` overrides the rule. An explicit `epochs`
always wins.

Learning rate. `lr` is the published value at the published batch size (`reference_batch`, 256 for the
Unlearn-Saliency recipes) and scales linearly with the batch size actually used; it is constant within
the short run (their MultiStepLR milestones, 91 and 136, are never reached in 10 epochs).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cvfm.errors import UsageError

Batch = dict[str, torch.Tensor]  # {"image": (B, C, H, W), "label": (B,)} on the training device

# Unlearn-Saliency's arg_parser: 182 training epochs, 10 unlearning epochs (Jia et al. 2023, Fan et al. 2024)
PAPER_TRAINING_EPOCHS = 182


@dataclass
class UnlearnConfig:
    """Settings every method shares (Unlearn-Saliency arg_parser defaults: SGD, momentum 0.9, wd 5e-4)."""

    lr: float = 0.01  # at `reference_batch`; scaled linearly by batch / reference_batch
    epochs: int | None = None  # None ("auto"): resolved from the original model's training epochs
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        check_option(self.lr > 0, "lr", self.lr, "a positive number")
        check_option(self.epochs is None or self.epochs >= 1, "epochs", self.epochs, "at least 1 (or auto)")
        check_option(0 <= self.momentum < 1, "momentum", self.momentum, "in [0, 1)")
        check_option(self.weight_decay >= 0, "weight_decay", self.weight_decay, "at least 0")


def check_option(ok: bool, key: str, value, expected: str) -> None:
    """A usage error naming the option, its value and what it should be, unless `ok`."""
    if not ok:
        raise UsageError(f"option {key}={value!r}: expected {expected}")


class UnlearnMethod(abc.ABC):
    """An approximate unlearning method: `passes(epoch)` names the passes of an epoch, `loss(model, batch,
    epoch)` scores one step.

    Pass names: "retain" and "forget" iterate that set (`batch` holds one key), "retain+forget" iterates
    the retain set with a forget batch beside each retain batch, the forget set cycled (`batch` holds
    both keys).
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[UnlearnConfig]] = UnlearnConfig
    exact: ClassVar[bool] = False  # approximate: the audit measures how well it forgot
    uses: ClassVar[tuple[str, ...]] = ("retain", "forget")  # the sets that must not be empty
    paper_epochs: ClassVar[int] = 10
    reference_batch: ClassVar[int] = 256
    advice: ClassVar[str] = "lower the learning rate (--opt lr=...)"

    def __init__(self, cfg: UnlearnConfig | None = None):
        self.cfg = cfg if cfg is not None else self.config_cls()

    def resolve_epochs(self, original_epochs: int | None) -> int:
        """The explicit `epochs`, else the paper's unlearning epochs scaled to the original training length
        (`max(1, round(original_epochs * paper_epochs / 182))`), else the paper's count."""
        if self.cfg.epochs is not None:
            return self.cfg.epochs
        if original_epochs is None:
            return self.paper_epochs
        return max(1, round(original_epochs * self.paper_epochs / PAPER_TRAINING_EPOCHS))

    def lr_at(self, batch_size: int) -> float:
        """The learning rate for `batch_size`: linear scaling from the published batch size."""
        return self.cfg.lr * batch_size / self.reference_batch

    def settings(self) -> dict:
        """JSON-able: the method's name and every option (as given, `epochs` may still be None)."""
        return {"method": self.name, **asdict(self.cfg)}

    def prepare(  # noqa: B027 (an optional hook)
        self, model: nn.Module, forget: Iterable[Batch], *, epochs: int, seed: int, num_classes: int | None
    ) -> None:
        """Called once before training, the model at its original weights. `forget` yields the forget set
        once, unshuffled (SalUn's saliency); most methods leave it unread."""

    @abc.abstractmethod
    def passes(self, epoch: int) -> list[str]:
        """The passes of `epoch` (0-based), in order."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Batch], epoch: int) -> tuple[torch.Tensor, dict]:
        """(loss to minimise, {name: float} to log) for one step; `batch` is keyed by set name."""

    def before_step(self, model: nn.Module) -> None:  # noqa: B027
        """After backward, before the optimizer step (SalUn masks gradients here)."""

    def after_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:  # noqa: B027
        """After the optimizer step (SalUn restores masked-out weights here)."""


def cross_entropy(model: nn.Module, batch: Batch, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the model's logits on `batch` (against `labels` when given)."""
    return F.cross_entropy(model(batch["image"]), batch["label"] if labels is None else labels)


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The named parameters the optimizer updates (a frozen backbone's are left out)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class RandomLabels:
    """Uniform random labels from a seeded generator: the same seed draws the same labels."""

    def __init__(self, seed: int, num_classes: int | None):
        self.generator = torch.Generator().manual_seed(seed)
        self.num_classes = num_classes

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Labels for a batch of logits (over `num_classes`, or the logits' width when unknown)."""
        n = self.num_classes or logits.shape[-1]
        return torch.randint(0, n, (logits.shape[0],), generator=self.generator).to(logits.device)
