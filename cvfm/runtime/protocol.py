"""What the training loop asks of a method. `cvfm.methods.base.Method` implements it; the loop knows nothing
else about methods (which model they train, which texts, labels or targets they read from the batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn


class TrainingMethod(Protocol):
    """An `nn.Module` (its state dict is what checkpoints hold) that turns a batch into a loss.

    `forward(batch, step)` gets the batch as `collate_fn()` made it (`batch["image"]`: the list of views
    `views()` made of each image; "label", "index", "text", "tokens" as the data has them) and returns
    (loss, logs of floats). `encoder` is the trained model: the loop hands it to the monitor and saves it
    with `encoder.save` as the run's `export_dir`. `frozen_teacher` (or None) is a module the method uses
    but never trains: it is kept out of the module tree, so it is neither checkpointed, exported, wrapped
    for DDP nor converted to SyncBatchNorm; the loop moves it to the device, in eval mode, without grad.
    Optimizer param groups with `apply_wd` get the step's weight decay from the `weight_decay` schedule,
    and each group the step's lr x its `lr_scale` (default 1; layer-wise lr decay).
    """

    encoder: nn.Module
    export_dir: str
    frozen_teacher: nn.Module | None
    weight_decay: tuple[float, float]  # start, end of a cosine schedule
    clip_grad: float | None
    summary_keys: tuple[str, ...]  # the logs printed in each epoch's summary line
    resolved: dict  # defaults the method resolved itself, recorded in run.json "resolved"

    def __call__(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]: ...

    def views(self) -> Callable: ...

    def collate_fn(self) -> Callable[[list], dict]: ...

    def peak_lr(self, batch_size: int) -> float: ...

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer: ...

    def before_optimizer_step(self, step: int) -> None: ...

    def after_optimizer_step(self, step: int) -> None: ...
