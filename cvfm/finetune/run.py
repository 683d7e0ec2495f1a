"""`finetune(cfg)`: full fine-tuning as a `cvfm pretrain` run of the `supervised` method (Accelerate,
checkpoints, exact resume, metrics.jsonl, curves.png), or a frozen backbone with a fitted head
(`cvfm.finetune.frozen`); either way the run's classifier/ and run.json["finetune"]."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from cvfm.eval.features import extract_features
from cvfm.finetune.config import FinetuneConfig, check, pretrain_config, recipe, saved_config
from cvfm.finetune.data import open_training_data
from cvfm.finetune.frozen import finetune_frozen
from cvfm.pretrain import pretrain
from cvfm.registry import create_classifier
from cvfm.runtime.device import default_device
from cvfm.runtime.run_dir import RunDir


def finetune(cfg: FinetuneConfig, on_step=None) -> Path:
    """Train a classifier on `cfg.data`; returns the run folder (run.json, classifier/).

    `on_step(step)` is called after each optimizer step of a full fine-tuning run (see `pretrain`)."""
    if cfg.resume:
        cfg = saved_config(cfg)
    elif cfg.num_workers is None:
        cfg = replace(cfg, num_workers=2)
    check(cfg)
    if cfg.frozen:
        return finetune_frozen(cfg)
    path = pretrain(pretrain_config(cfg), on_step, record={"finetune": recipe(cfg)})
    from accelerate import PartialState

    if PartialState().is_main_process:
        _record_train_top1(cfg, path)
    return path


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
