"""`cvfm finetune`: train the classifier that machine unlearning starts from.

Two ways, one output (`<run>/classifier/`, a `Classifier`):
- full fine-tuning: the pre-training loop (`cvfm.runtime.trainer`) with the `supervised` method, so it
  has Accelerate, checkpoints, exact resume, metrics.jsonl and curves.png;
- a frozen backbone (`freeze=True`, or `head="knn"`): features of the training data once, with the
  encoder's evaluation transform, then a linear head (`cvfm.eval.linear.train_linear`, the probe's
  learning-rate / weight-decay sweep when no lr is given) or a k-NN bank. `fit_frozen_classifier` is
  deterministic given (items in source order, seed): `cvfm unlearn --method head` refits it on the
  retain data and gets, bit for bit, what `finetune` gives with the forgotten ids excluded.

run.json["finetune"] holds the `FinetuneConfig`: `finetune(FinetuneConfig(**run_json["finetune"]))`
with another output (and exclusions) reruns the same recipe (`cvfm unlearn --method retrain`), and
data_items.jsonl the items it was trained on (`cvfm.data.digest`), so that rerun can be checked to see
the same data.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from cvfm.data.exclude import exclude_from
from cvfm.data.loader import SkipLog
from cvfm.data.sources import ImageSource, open_source
from cvfm.errors import UsageError
from cvfm.eval.features import extract_features
from cvfm.eval.linear import sweep_linear, train_linear
from cvfm.models.classifier import (
    Classifier,
    KnnHead,
    LinearHead,
    class_names,
    labelled_classes,
)
from cvfm.models.encoder import Encoder
from cvfm.registry import create_classifier, create_encoder
from cvfm.runtime.device import default_device
from cvfm.runtime.precision import DTYPES, training_precision
from cvfm.runtime.progress import log
from cvfm.runtime.run_dir import RunDir
from cvfm.runtime.threads import share_cores_with_workers
from cvfm.runtime.trainer import PretrainConfig, pretrain, save_atomically, versions

HEADS = ("linear", "knn")


@dataclass
class FinetuneConfig:
    data: str
    output: str
    model: str = "cvfm/tiny-resnet"
    pretrained: bool = False  # the registry's pretrained weights; a folder's own weights are always loaded
    split: str | None = "train"
    image_column: str = "image"
    label_column: str | None = None
    head: str = "linear"  # "linear" | "knn" (knn implies freeze)
    freeze: bool = False  # frozen backbone: features once (eval transform), head fitted on them
    epochs: int = 30
    batch_size: int = 128
    lr: float | None = None  # full: 0.1 x batch / 256 (SGD); frozen linear: the probe's sweep
    weight_decay: float = 5e-4  # Jia et al. 2023 / SalUn
    augment: bool = True  # full fine-tuning: RandomResizedCrop(0.8, 1) + flip
    precision: str = "fp32"
    seed: int = 0
    num_workers: int | None = 2  # None: 2, or on resume the run's own
    k: int = 20  # k-NN head: DINO's k-NN evaluation
    temperature: float = 0.07
    exclude: str | None = None  # a file of ids (text: one per line; JSONL: "id" field) left out of training
    ledger: str | None = None  # ids forgotten in this ledger are left out too
    overwrite: bool = False
    resume: bool = False
    strict: bool = False

    @property
    def frozen(self) -> bool:
        return self.freeze or self.head == "knn"

    @property
    def load_weights(self) -> bool:
        """Start from trained weights: the registry's when asked, a folder's (a pre-training run) always."""
        return self.pretrained or Path(self.model).is_dir()


def finetune(cfg: FinetuneConfig, on_step=None) -> Path:
    """Train a classifier on `cfg.data`; returns the run folder (run.json, classifier/).

    `on_step(step)` is called after each optimizer step of a full fine-tuning run (see `pretrain`)."""
    if cfg.resume:
        cfg = _saved_config(cfg)
    elif cfg.num_workers is None:
        cfg = replace(cfg, num_workers=2)
    _check(cfg)
    if cfg.frozen:
        return _finetune_frozen(cfg)
    path = pretrain(_pretrain_config(cfg), on_step, record={"finetune": recipe(cfg)})
    from accelerate import PartialState

    if PartialState().is_main_process:
        _record_train_top1(cfg, path)
    return path


def recipe(cfg: FinetuneConfig) -> dict:
    """The config as run.json stores it: rerunnable as is (no overwrite / resume flags)."""
    return asdict(replace(cfg, overwrite=False, resume=False))


def _saved_config(cfg: FinetuneConfig) -> FinetuneConfig:
    saved = RunDir(cfg.output, resume=True).read()
    if "finetune" not in saved:
        raise UsageError(
            f"cannot resume: '{cfg.output}' is not a cvfm finetune run (no \"finetune\" in run.json)"
        )
    workers = saved["finetune"]["num_workers"] if cfg.num_workers is None else cfg.num_workers
    resumed = FinetuneConfig(
        **{**saved["finetune"], "output": cfg.output, "resume": True, "num_workers": workers}
    )
    if resumed.frozen:
        raise UsageError(
            f"'{cfg.output}' is a frozen-backbone run: it has no checkpoints to resume; "
            "rerun it with --overwrite"
        )
    return resumed


def _check(cfg: FinetuneConfig) -> None:
    if cfg.head not in HEADS:
        raise UsageError(f"--head must be linear or knn, not '{cfg.head}'")
    training_precision(cfg.precision)  # refuses a name it does not know
    if not cfg.data:
        raise UsageError("--data is required (unless --resume continues an existing run)")
    if cfg.head == "knn" and cfg.k < 1:
        raise UsageError(f"--k must be at least 1, got {cfg.k}")


def _pretrain_config(cfg: FinetuneConfig) -> PretrainConfig:
    """Full fine-tuning as a run of the shared trainer with the `supervised` method."""
    return PretrainConfig(
        data=cfg.data,
        output=cfg.output,
        method="supervised",
        model=cfg.model,
        pretrained=cfg.load_weights,
        split=cfg.split,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        precision=cfg.precision,
        seed=cfg.seed,
        num_workers=cfg.num_workers,
        strict=cfg.strict,
        overwrite=cfg.overwrite,
        resume=cfg.resume,
        exclude=cfg.exclude,
        ledger=cfg.ledger,
        options={"augment": cfg.augment, "weight_decay": cfg.weight_decay},
    )


def open_training_data(
    cfg: FinetuneConfig, quiet: bool = False
) -> tuple[ImageSource, list[str], dict | None]:
    """The labelled training source without the excluded ids, the class names of the whole source, and
    run.json's "excluded" record (None when nothing is excluded); `quiet`: no log line about them."""
    source = open_source(
        cfg.data,
        split=cfg.split,
        image_column=cfg.image_column,
        label_column=cfg.label_column,
        strict=cfg.strict,
    )
    classes = labelled_classes(source, cfg.data)
    if not (cfg.exclude or cfg.ledger):
        return source, classes, None
    source, excluded = exclude_from(source, cfg.exclude, cfg.ledger)
    if not quiet:
        log(f"left out {excluded['count']} training image(s) ({excluded['requested']} id(s) to exclude)")
    return source, classes, excluded


def _record_train_top1(cfg: FinetuneConfig, path: Path) -> None:
    """Top-1 of the fine-tuned classifier on its training data (evaluation transform), into run.json."""
    run = RunDir(path, resume=True)
    source, _, _ = open_training_data(replace(cfg, strict=False), quiet=True)
    classifier = create_classifier(str(path / "classifier"))
    device = default_device()
    logits, labels, _ = extract_features(
        classifier, source, num_workers=cfg.num_workers, device=device, desc="train top-1"
    )
    run.update(train_top1=float((logits.argmax(1) == labels).mean()) if len(labels) else None)


def _finetune_frozen(cfg: FinetuneConfig) -> Path:
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
        return cfg.lr, cfg.weight_decay, None
    return sweep_linear(x, y, num_classes, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=cfg.seed)


__all__ = ["FinetuneConfig", "finetune", "fit_frozen_classifier"]
