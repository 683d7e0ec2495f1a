"""`cvfm pretrain`: self-supervised pre-training, CLIP on image-text pairs, BLIP's captioner / filter
fine-tuning, and supervised fine-tuning of a classifier (what `cvfm finetune` runs), all in the shared loop
(`cvfm.runtime.loop.Trainer`).

This module resolves the request (the method's defaults, a resumed run's own config), opens the data,
builds the model the method trains (`Method.model_kind`: an image encoder, a dual encoder or a paired one,
a BLIP captioner or matcher, a classifier over the data's classes), the method and the `--monitor`, and
hands them to the loop, which saves the trained model as the run's `export_dir` (backbone/, classifier/).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from cvfm.methods import build_method, method_class
from cvfm.pretrain.config import PretrainConfig, resolve_defaults, saved_config
from cvfm.pretrain.data import open_training_data
from cvfm.pretrain.models import build_model
from cvfm.pretrain.monitor import Monitor
from cvfm.runtime.loop import Trainer
from cvfm.runtime.run_dir import RunDir


def pretrain(
    cfg: PretrainConfig, on_step: Callable[[int], None] | None = None, *, record: dict | None = None
) -> Path:
    """Pre-train `cfg.model` on `cfg.data` with `cfg.method`; returns the run folder.

    `on_step(step)` is called after each optimizer step. The first Ctrl-C / SIGTERM stops the run after
    the current step and saves a checkpoint (raising `cvfm.runtime.stop.Interrupted`); `resume=True`
    continues from it. `record` adds fields to run.json (`cvfm finetune` stores its own config there).
    """
    cfg = resolve_defaults(saved_config(cfg))
    run = RunDir(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume)  # refuse early, create later
    cls = method_class(cfg.method)
    source, classes, excluded = open_training_data(cfg, run, texts=cls.needs_text(), labels=cls.needs_labels)
    torch.manual_seed(cfg.seed)  # the same initial weights on every process and every resume
    model = build_model(cfg, cls.model_kind, classes)
    trainer = Trainer(cfg, run)
    budget = trainer.plan(len(source))
    method = build_method(cfg.method, model, cfg.options, budget)
    monitor = Monitor(cfg, cls.model_kind, model) if cfg.monitor and trainer.is_main else None
    return trainer.fit(
        method,
        source,
        budget,
        evaluate=monitor,
        on_step=on_step,
        on_end=lambda folder: method.after_training(folder, source),
        record={
            "config": asdict(cfg),
            "method_config": asdict(method.cfg),
            "data": {"name": source.name, "images": len(source), "classes": classes or source.classes},
            "excluded": excluded,
            **(record or {}),
        },
    )
