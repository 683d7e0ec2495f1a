"""`cvfm distill`: resolve the request (a resumed run's own config), open the data, build the teacher
(frozen) and the student, and train the student in the shared loop, which exports it as backbone/."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from cvfm.data.sources import open_source
from cvfm.distill.cache import TeacherCache
from cvfm.distill.config import DistillConfig
from cvfm.distill.method import Distill
from cvfm.distill.teacher import load_teacher
from cvfm.registry import create_encoder
from cvfm.runtime.loop import Trainer
from cvfm.runtime.run_dir import RunDir, resumed_config


def distill(cfg: DistillConfig, on_step: Callable[[int], None] | None = None) -> Path:
    """Distil `cfg.teacher` into `cfg.student` on `cfg.data`; returns the run folder (backbone/: the
    student, loadable as a registry backbone; with a SAM teacher also segmenter/, the student as a SAM's
    image encoder). Ctrl-C / SIGTERM checkpoints; `resume=True` continues."""
    cfg = resumed_config(cfg, "cvfm distill").check()
    run = RunDir(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume)  # refuse early, create later
    source = open_source(cfg.data, split=cfg.split, image_column=cfg.image_column, strict=cfg.strict)
    torch.manual_seed(cfg.seed)  # the same weights on every process and every resume
    student = create_encoder(cfg.student, pretrained=cfg.pretrained)
    teacher = load_teacher(cfg.teacher, cfg.losses, student.preprocess, cfg.teacher_layer)
    trainer = Trainer(cfg, run)
    budget = trainer.plan(len(source))
    cache = TeacherCache(cfg.cache_teacher, teacher_identity(cfg, teacher)) if cfg.cache_teacher else None
    method = Distill(student, cfg, budget, teacher, cache)
    return trainer.fit(
        method,
        source,
        budget,
        on_step=on_step,
        on_end=lambda folder: method.after_training(folder, source),
        record={
            "config": asdict(cfg),
            "teacher": {"id": cfg.teacher, "name": teacher.name},
            "data": {"name": source.name, "images": len(source), "classes": source.classes},
        },
    )


def teacher_identity(cfg: DistillConfig, teacher: torch.nn.Module) -> str:
    """What the cached outputs depend on besides the view: the teacher's weights (a run folder trained
    again is another teacher), its layer, the losses' heads, and the views' input size and normalisation
    (the student's; a SAM teacher's own)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode() + tensor.detach().float().cpu().contiguous().numpy().tobytes())
    pre = teacher.views
    setup = (digest.hexdigest(), cfg.teacher_layer, sorted(cfg.losses), pre.size, pre.mean, pre.std)
    return repr(setup)
