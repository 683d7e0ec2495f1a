"""The one training loop that every approximate unlearning method shares.

It trains the model in place with SGD (built once, constant learning rate) for the given epochs; each
epoch runs the method's passes over the retain and forget sets. Reproducible: every pass draws its order
from a generator seeded by (seed, stream), where streams are numbered in the order the run opens them,
each sample's augmentation is seeded by (seed, stream, index) (`ImageDataset`), and the global RNG by
(seed, step). Unreadable images are skipped and counted, never fatal (unless `strict`).

BatchNorm behaves as in training (train mode), except inside submodules none of whose parameters train
(a frozen backbone): those stay in eval mode, so their running statistics do not drift either.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader

from cvfm.data.loader import ImageDataset, SkipLog, collate
from cvfm.data.sources import DataError, ImageSource
from cvfm.errors import UsageError
from cvfm.runtime.progress import progress
from cvfm.unlearn.methods.base import Batch, UnlearnMethod


def run_unlearning(
    model: nn.Module,
    method: UnlearnMethod,
    retain: ImageSource,
    forget: ImageSource,
    *,
    transform: Callable,
    batch_size: int = 128,
    epochs: int | None = None,
    seed: int = 0,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    strict: bool = False,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """Unlearn `forget` from `model` (whose `model(x)` returns class logits), training it in place.

    `epochs=None` takes `method.resolve_epochs(None)` (the explicit option or the paper's count);
    callers that know the original training length pass `method.resolve_epochs(original_epochs)`.
    `num_classes` sizes random labels (default: the width of the logits). `on_step` gets each step's
    record. Returns logs: per-epoch mean losses, steps, the learning rate, skipped images and wall time.
    """
    started = time.perf_counter()
    epochs = method.resolve_epochs(None) if epochs is None else epochs
    if epochs < 1:
        raise UsageError(f"epochs must be at least 1, not {epochs}")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, not {batch_size}")
    _check_sets(method, retain, forget)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError(
            f"{method.name}: every parameter of the model is frozen, so there is nothing to train"
        )
    lr = method.lr_at(batch_size)
    optimizer = torch.optim.SGD(
        params, lr=lr, momentum=method.cfg.momentum, weight_decay=method.cfg.weight_decay
    )
    skips = SkipLog(strict)
    stream = _Streams(
        {
            "retain": ImageDataset(retain, transform, seed=seed),
            "forget": ImageDataset(forget, transform, seed=seed),
        },
        seed=seed,
        batch_size=batch_size,
        num_workers=num_workers,
        device=device,
        skips=skips,
    )
    method.prepare(model, stream("forget", shuffle=False), epochs=epochs, seed=seed, num_classes=num_classes)
    _train_mode(model)

    history, step = [], 0
    for epoch in range(epochs):
        passes = method.passes(epoch)
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        total = sum(stream.length("retain" if p == "retain+forget" else p) for p in passes)
        with progress(f"{method.name} epoch {epoch + 1}/{epochs}", total=total) as advance:
            for name in passes:
                for batch in _pass(stream, name):
                    torch.manual_seed((seed * 1_000_003 + step) * 1009)  # dropout etc., as the trainer
                    step += 1
                    value, logs = _step(
                        model, method, optimizer, batch, epoch, where=f"{name} pass, step {step}"
                    )
                    for key, v in {f"loss_{name}": value, **logs}.items():
                        sums[key] += v
                        counts[key] += 1
                    if on_step is not None:
                        on_step({"epoch": epoch + 1, "step": step, "pass": name, "loss": value, **logs})
                    advance(1)
        record = {"epoch": epoch + 1, "passes": passes, "steps": sum(counts[f"loss_{p}"] for p in passes)}
        record.update({k: sums[k] / counts[k] for k in sums})
        history.append(record)
    model.eval()
    return {
        "epochs": history,
        "steps": step,
        "lr": lr,
        "skipped": len(skips.entries),
        "skipped_items": skips.as_list(),
        "wall_s": time.perf_counter() - started,
    }


def _step(model, method: UnlearnMethod, optimizer, batch: dict[str, Batch], epoch: int, where: str):
    """One update: the method's loss (checked finite), backward, the method's hooks around the step."""
    loss, logs = method.loss(model, batch, epoch)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(
            f"{method.name}: the loss is {value} at epoch {epoch + 1} ({where}): {method.advice}"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    method.before_step(model)
    optimizer.step()
    method.after_step(model, optimizer)
    return value, logs


def _check_sets(method: UnlearnMethod, retain: ImageSource, forget: ImageSource) -> None:
    for name, source in (("retain", retain), ("forget", forget)):
        if name in method.uses and len(source) == 0:
            raise UsageError(
                f"{method.name} needs a non-empty {name} set, and this one is empty"
                + (" (nothing to forget)" if name == "forget" else " (use --method retrain or head)")
            )


def _train_mode(model: nn.Module) -> None:
    """Train mode, except submodules whose parameters are all frozen (their BatchNorm stays in eval)."""
    model.train()
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


class _Streams:
    """Opens seeded passes over the retain and forget sets; each call is a new stream number."""

    def __init__(self, datasets: dict[str, ImageDataset], *, seed, batch_size, num_workers, device, skips):
        self.datasets, self.seed, self.batch_size = datasets, seed, batch_size
        self.num_workers, self.device, self.skips = num_workers, device, skips
        self.count = 0

    def length(self, name: str) -> int:
        return math.ceil(len(self.datasets[name]) / self.batch_size)

    def __call__(self, name: str, shuffle: bool = True) -> Iterator[Batch]:
        dataset, number = self.datasets[name], self.count
        self.count += 1
        return self._batches(dataset, number, shuffle)

    def _batches(self, dataset: ImageDataset, number: int, shuffle: bool) -> Iterator[Batch]:
        dataset.set_epoch(number)
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=collate,
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + number),
        )
        for batch in loader:
            self.skips.add(batch["skipped"])
            if batch["image"] is None:  # every image of this batch was unreadable
                continue
            yield {"image": batch["image"].to(self.device), "label": batch["label"].to(self.device)}


def _pass(stream: _Streams, name: str) -> Iterator[dict[str, Batch]]:
    """The batches of one pass, keyed by set name; "retain+forget" pairs each retain batch with the next
    forget batch, starting the forget set over whenever it runs out."""
    if name in ("retain", "forget"):
        for batch in stream(name):
            yield {name: batch}
        return
    if name != "retain+forget":
        raise ValueError(f"unknown pass '{name}'")
    forget = _cycle(stream)
    for batch in stream("retain"):
        yield {"retain": batch, "forget": next(forget)}


def _cycle(stream: _Streams) -> Iterator[Batch]:
    while True:
        empty = True
        for batch in stream("forget"):
            empty = False
            yield batch
        if empty:
            raise DataError("no forget image could be read")
