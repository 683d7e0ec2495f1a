"""Accelerate for a training run: one CPU, one GPU or many processes, mixed precision, the metric trackers;
and the checks that keep a resumed run on the processes and CPU threads it started with."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, DataLoaderConfiguration

from cvfm.errors import UsageError
from cvfm.runtime.plan import TrainSettings
from cvfm.runtime.precision import training_precision
from cvfm.runtime.run_dir import RunDir
from cvfm.runtime.threads import share_cores_with_workers, use_threads
from cvfm.runtime.tracking import JsonlTracker

TRACKERS = ("jsonl", "tensorboard", "wandb")


def cpu_processes() -> bool:
    """Several processes (torchrun / accelerate launch) on a machine without GPUs: they run on the CPU over
    gloo. The first Accelerator or PartialState a process makes must be told so (`cpu=True`); made without,
    it sets up one process on its own, for good."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(settings: TrainSettings, run: RunDir) -> Accelerator:
    """metrics.jsonl is always logged; `settings.log` adds TensorBoard or W&B."""
    mixed_precision = training_precision(settings.precision)
    trackers: list = [JsonlTracker(run.metrics)]
    for name in settings.log:
        if name not in TRACKERS:
            raise UsageError(f"--log must be jsonl, tensorboard or wandb, not '{name}'")
        if name != "jsonl":
            trackers.append(name)
    return Accelerator(
        cpu=cpu_processes(),
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=settings.grad_accum,
        log_with=trackers,
        project_dir=str(run.path),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=settings.seed),
    )


def run_threads(settings: TrainSettings, run: RunDir) -> int:
    """Torch's intra-op threads for a CPU run: a resumed run's own count (its floating-point sums then
    run in the same order), else the cores the decoding workers leave free."""
    saved = (run.read().get("resolved") or {}).get("cpu_threads") if settings.resume else None
    if saved is None:
        return share_cores_with_workers(settings.num_workers)
    return use_threads(saved, f"run '{run.path}'")


def check_processes(run: RunDir, world: int) -> None:
    """A run resumes on the number of processes it started on: `--batch-size` is per process, so any
    other number would change the global batch, the step plan and the schedules half-way."""
    before = run.read().get("resolved", {}).get("num_processes", world)
    if before != world:
        raise UsageError(
            f"cannot resume '{run.path}' on {world} process(es): it was trained by {before} "
            f"(the global batch is --batch-size x processes); resume it with {before}"
        )
