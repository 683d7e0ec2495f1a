"""Linear probe on frozen features with a small learning-rate / weight-decay sweep.

Features are standardised (a BatchNorm without affine, as in MAE's linear probe), a linear layer is
trained with AdamW and a cosine schedule; the sweep point with the best accuracy on a validation
split held out from the training set (10%, stratified, seeded) is retrained on all training data
and scored on the test set.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F

from cvfm.eval.knn import topk_accuracy

LRS = (1e-3, 3e-3, 1e-2)
WEIGHT_DECAYS = (0.0, 1e-4, 1e-2)


def train_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    lr: float,
    wd: float,
    epochs: int,
    batch_size: int,
    seed: int,
) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    layer = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=g)
        layer.bias.zero_()
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * max(1, (len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    xs = (x - mean) / std
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(layer(xs[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return layer, mean, std


def _val_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        val.extend(members[: max(1, int(round(len(members) * fraction)))])
    mask = np.zeros(len(y), bool)
    mask[val] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


@torch.no_grad()
def _scores(layer, mean, std, x):
    return layer((x - mean) / std)


def sweep_linear(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    *,
    lrs=LRS,
    weight_decays=WEIGHT_DECAYS,
    epochs: int = 50,
    batch_size: int = 256,
    seed: int = 0,
    val_fraction: float = 0.1,
) -> tuple[float, float, float]:
    """(lr, weight decay, validation top-1) of the sweep point that scores best on a seeded, stratified
    `val_fraction` of the training data (the first of equals wins)."""
    fit, val = _val_split(y.numpy(), val_fraction, seed)
    best = None
    for lr, wd in itertools.product(lrs, weight_decays):
        layer, m, s = train_linear(x[fit], y[fit], num_classes, lr, wd, epochs, batch_size, seed)
        acc = topk_accuracy(_scores(layer, m, s, x[val]), y[val], ks=(1,))[1]
        if best is None or acc > best[2]:
            best = (lr, wd, acc)
    return best


def linear_evaluate(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    *,
    lrs=LRS,
    weight_decays=WEIGHT_DECAYS,
    epochs: int = 50,
    batch_size: int = 256,
    seed: int = 0,
    val_fraction: float = 0.1,
) -> dict[str, float]:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    x, y = torch.from_numpy(train).float(), torch.from_numpy(train_labels).long()
    lr, wd, val_acc = sweep_linear(
        x,
        y,
        num_classes,
        lrs=lrs,
        weight_decays=weight_decays,
        epochs=epochs,
        batch_size=batch_size,
        seed=seed,
        val_fraction=val_fraction,
    )
    layer, m, s = train_linear(x, y, num_classes, lr, wd, epochs, batch_size, seed)
    acc = topk_accuracy(
        _scores(layer, m, s, torch.from_numpy(test).float()), torch.from_numpy(test_labels).long()
    )
    metrics = {"linear_top1": acc[1], "val_top1": val_acc, "best_lr": lr, "best_weight_decay": wd}
    if num_classes > 5:
        metrics["linear_top5"] = acc[5]
    return metrics
