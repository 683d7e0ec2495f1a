"""A frozen backbone: features of the training data once (the encoder's evaluation transform), then a
linear head (the linear probe's lr / weight-decay sweep when no lr is given) or a k-NN bank.
`fit_frozen_classifier` is deterministic given (items in source order, seed): `cvfm unlearn --method head`
refits it on the retain data and gets, bit for bit, what `finetune` gives with the forgotten ids excluded."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from cvfm.data.loader import SkipLog
from cvfm.data.sources import ImageSource
from cvfm.errors import UsageError
from cvfm.eval.features import extract_features
from cvfm.eval.linear import sweep_linear, train_linear
from cvfm.finetune.config import FinetuneConfig, recipe
from cvfm.finetune.data import open_training_data
from cvfm.methods.supervised import RECIPES
from cvfm.models.classifier import Classifier, KnnHead, LinearHead, class_names
from cvfm.models.encoder import Encoder
from cvfm.registry import create_encoder
from cvfm.runtime.device import default_device
from cvfm.runtime.files import save_atomically
from cvfm.runtime.precision import DTYPES
from cvfm.runtime.run_dir import RunDir, versions
from cvfm.runtime.threads import share_cores_with_workers


def finetune_frozen(cfg: FinetuneConfig) -> Path:
    """A frozen-backbone run: no checkpoints (one pass of features, then the head)."""
    t0 = time.perf_counter()
    run = RunDir(cfg.output, overwrite=cfg.overwrite)  # refuse early, create later
    source, classes, excluded = open_training_data(cfg)
    torch.manual_seed(cfg.seed)
    encoder = create_encoder(cfg.model, pretrained=cfg.load_weights)
    _check_saveable(encoder, cfg.model)
    run.create()
    device = default_device()
    if device == "cpu":
        share_cores_with_workers(cfg.num_workers)
    skips = SkipLog(cfg.strict, source.skipped)
    run.update(finetune=recipe(cfg), config=recipe(cfg), status="running", seed=cfg.seed, versions=versions())
    run.record_data(source)
    classifier = fit_frozen_classifier(encoder, source, cfg, classes=classes, device=device, skips=skips)
    save_atomically(classifier, run.path / "classifier")
    run.update(
        resolved=classifier.fit,
        data={"name": source.name, "images": classifier.fit["images"], "classes": classes},
        excluded=excluded,
        train_top1=classifier.fit["train_top1"],
        skipped=skips.as_list(),
        status="finished",
        wall_s=round(time.perf_counter() - t0, 2),
    )
    return run.path


def _check_saveable(encoder: Encoder, model: str) -> None:
    from cvfm.models.pixels import PixelEncoder

    if isinstance(encoder, PixelEncoder):
        raise UsageError(f"'{model}' has no weights to save with a classifier: use a registry backbone")


def fit_frozen_classifier(
    encoder: Encoder,
    source: ImageSource,
    cfg: FinetuneConfig,
    *,
    classes: list[str] | None = None,
    device: str | None = None,
    skips: SkipLog | None = None,
) -> Classifier:
    """A classifier with `encoder` frozen and a head fitted on its features of `source` (in eval mode).

    The head is `cfg.head`: a k-NN bank (ids = item ids, k = cfg.k) or a linear layer on standardised
    features (`train_linear`, cfg.epochs / batch_size / seed; with no cfg.lr, the lr and weight decay
    that score best on a seeded 10% validation split among the linear probe's sweep). `classes` default
    to the source's; pass the original ones when `source` is a subset whose labels are bare integers
    (a forgotten class would shrink the head). `classifier.fit` records what was chosen. The classifier
    is returned on `device`, in eval mode.
    """
    classes = classes or class_names(source)
    device = default_device(device)
    feats, labels, index = extract_features(
        encoder,
        source,
        num_workers=cfg.num_workers,
        device=device,
        skips=skips,
        autocast_dtype=DTYPES.get(cfg.precision),
        desc="training features",
    )
    if len(feats) == 0:
        raise UsageError(f"no readable images in '{source.name}' to fit a head on")
    x, y = torch.from_numpy(feats).float(), torch.from_numpy(labels).long()
    fit: dict = {"head": cfg.head, "images": int(len(x))}
    if cfg.head == "knn":
        ids = [source.items[i].id for i in index]
        head: LinearHead | KnnHead = KnnHead.fit(
            x, y, ids, len(classes), k=cfg.k, temperature=cfg.temperature
        )
        fit.update(k=cfg.k, temperature=cfg.temperature)
    else:
        lr, wd, val_top1 = _choose_lr(x, y, len(classes), cfg)
        layer, mean, std = train_linear(x, y, len(classes), lr, wd, cfg.epochs, cfg.batch_size, cfg.seed)
        head = LinearHead(x.shape[1], len(classes))
        with torch.no_grad():
            head.mean.copy_(mean)
            head.std.copy_(std)
        head.linear.load_state_dict(layer.state_dict())
        fit.update(lr=lr, weight_decay=wd, val_top1=val_top1, epochs=cfg.epochs, batch_size=cfg.batch_size)
    with torch.no_grad():
        fit["train_top1"] = float((head(x).argmax(1) == y).float().mean())
    classifier = Classifier(encoder, head, classes, frozen=True, backbone=cfg.model, fit=fit)
    return classifier.to(device).eval()


def _choose_lr(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: FinetuneConfig):
    """(lr, weight decay, validation top-1): cfg's, or the best of the linear probe's sweep (seeded)."""
    if cfg.lr is not None:
        return cfg.lr, RECIPES["sgd"][1] if cfg.weight_decay is None else cfg.weight_decay, None
    return sweep_linear(x, y, num_classes, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed)
