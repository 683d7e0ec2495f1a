"""The loop's settings and its step plan: how many optimizer steps a run of `epochs` over the data takes."""

from __future__ import annotations

from dataclasses import dataclass

from cvfm.errors import UsageError


@dataclass
class TrainSettings:
    """What the generic loop needs to know about a run (`cvfm.pretrain.PretrainConfig` adds the rest)."""

    epochs: int = 10
    batch_size: int = 64  # per process
    lr: float | None = None  # auto: the method's `peak_lr(global batch)`
    warmup_epochs: float = 1.0  # capped at 10% of the run
    min_lr: float = 1e-6
    grad_accum: int = 1
    precision: str = "fp32"
    seed: int = 0
    num_workers: int | None = 2  # None: 2, or on resume the run's own
    checkpoint_every: int = 500  # steps; a checkpoint is also written at the end of each epoch
    keep_checkpoints: int = 2
    log: tuple[str, ...] = ("jsonl",)
    strict: bool = False
    resume: bool = False


@dataclass
class Budget:
    """What a method may size its defaults from: dataset size and the step plan."""

    num_images: int
    steps_per_epoch: int
    total_steps: int
    batch_size: int  # global: per process x processes x accumulation steps


def plan_steps(settings: TrainSettings, num_images: int, processes: int) -> Budget:
    """Whole batches only: an epoch's tail that fills no batch (or no accumulation cycle) is dropped."""
    s = settings
    steps_per_epoch = num_images // (s.batch_size * processes) // s.grad_accum
    if steps_per_epoch < 1:
        raise UsageError(
            f"{num_images} images make no full batch of {s.batch_size} x {processes} processes "
            f"x {s.grad_accum} accumulation steps: lower --batch-size"
        )
    return Budget(
        num_images, steps_per_epoch, steps_per_epoch * s.epochs, s.batch_size * processes * s.grad_accum
    )
