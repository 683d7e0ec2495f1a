"""`cvfm segment train`: SAM's data engine on the user's data. A promptable segmenter is fine-tuned on images
with instance masks (`cvfm.data.masks_source.open_masks`) by the interactive recipe of the SAM paper
(`cvfm.segment.method.SamTraining`), optionally joined by the masks `cvfm segment auto` made for unlabelled
images (`cvfm.segment.pseudo`), in the shared training loop (Accelerate, checkpoints, exact resume,
metrics.jsonl, curves.png). With `encoder` a cvfm backbone replaces the SAM's image encoder
(`cvfm.models.backbone_sam`). The run's backbone/ is the trained segmenter: `create_segmenter(run)`,
`cvfm segment prompt|auto <run>` and `cvfm evaluate segmentation <run>` load it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from cvfm.data.items import ImageSource
from cvfm.data.masks_source import open_masks
from cvfm.data.sources import concat, subset
from cvfm.errors import UsageError
from cvfm.methods.base import configure
from cvfm.models.backbone_sam import BackboneSegmenter
from cvfm.registry import create_encoder, create_segmenter
from cvfm.runtime.loop import Trainer
from cvfm.runtime.plan import TrainSettings
from cvfm.runtime.progress import log
from cvfm.runtime.run_dir import RunDir, resumed_config
from cvfm.segment.method import SamTrainConfig, SamTraining
from cvfm.segment.pseudo import open_pseudo


@dataclass(kw_only=True)
class SegmentTrainConfig(TrainSettings):
    """The loop's settings plus the data and model, as run.json keeps them ("config")."""

    data: str
    output: str
    model: str
    batch_size: int = 8  # images per process; each brings up to `instances` masks (SAM: 256 images)
    split: str | None = None
    image_root: str | None = None  # a COCO file's images
    pseudo: str | None = None  # a cvfm segment auto output for unlabelled images
    pseudo_images: str | None = None  # the data auto labelled (the images of `pseudo`)
    pseudo_split: str | None = None
    pseudo_min_iou: float = 0.0
    pseudo_min_stability: float = 0.0
    encoder: str | None = None  # a cvfm backbone in place of the SAM's image encoder (a fresh neck)
    train_encoder: bool = False
    options: dict = field(default_factory=dict)  # SamTrainConfig's fields (--opt key=value)
    overwrite: bool = False
    trust_remote_code: bool = False


def segment_train(cfg: SegmentTrainConfig, on_step: Callable[[int], None] | None = None) -> Path:
    """Fine-tune `cfg.model` on `cfg.data` (and `cfg.pseudo`); returns the run folder.

    The first Ctrl-C / SIGTERM stops the run after the current step and saves a checkpoint (raising
    `cvfm.runtime.stop.Interrupted`); `resume=True` continues it, from its own run.json config."""
    cfg = resumed_config(cfg, "cvfm segment train")
    if cfg.split is None and cfg.data.startswith("builtin:"):
        cfg = replace(cfg, split="train")  # a built-in set's test split is for `cvfm evaluate segmentation`
    run = RunDir(cfg.output, overwrite=cfg.overwrite, resume=cfg.resume)  # refuse early, create later
    recipe = configure(SamTrainConfig, cfg.options)
    recipe = replace(recipe, train_encoder=recipe.train_encoder or cfg.train_encoder)
    source, data_record = training_data(cfg)
    torch.manual_seed(cfg.seed)
    segmenter = create_segmenter(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if cfg.encoder:
        encoder = create_encoder(cfg.encoder, trust_remote_code=cfg.trust_remote_code)
        segmenter = BackboneSegmenter.attach(segmenter, encoder)
    trainer = Trainer(cfg, run)
    budget = trainer.plan(len(source))
    method = SamTraining(segmenter, recipe, budget)
    return trainer.fit(
        method,
        source,
        budget,
        on_step=on_step,
        record={"config": asdict(cfg), "method_config": asdict(recipe), "data": data_record},
    )


def training_data(cfg: SegmentTrainConfig) -> tuple[ImageSource, dict]:
    """The labelled images with masks, then the pseudo-labelled ones; images without masks left out."""
    pseudo_only = (cfg.pseudo_images, cfg.pseudo_split, cfg.pseudo_min_iou, cfg.pseudo_min_stability)
    if not cfg.pseudo and any(pseudo_only):
        raise UsageError(
            "--pseudo-images, --pseudo-split and --pseudo-min-* go with --pseudo (an auto output)"
        )
    labelled = with_masks(open_masks(cfg.data, split=cfg.split, image_root=cfg.image_root, strict=cfg.strict))
    record = {"name": labelled.name, "images": len(labelled), "masks": _count(labelled)}
    if not cfg.pseudo:
        return labelled, record
    if not cfg.pseudo_images:
        raise UsageError(
            "--pseudo needs --pseudo-images: the data (folder, manifest, ...) cvfm segment auto read"
        )
    pseudo, record["pseudo"] = open_pseudo(
        cfg.pseudo,
        cfg.pseudo_images,
        split=cfg.pseudo_split,
        min_iou=cfg.pseudo_min_iou,
        min_stability=cfg.pseudo_min_stability,
        strict=cfg.strict,
    )
    p = record["pseudo"]
    log(
        f"pseudo-labels: {p['masks']} of {p['masks_read']} masks kept on {p['images']} of "
        f"{p['images_labelled']} auto-labelled images (predicted IoU >= {cfg.pseudo_min_iou}, "
        f"stability >= {cfg.pseudo_min_stability})"
    )
    if not len(pseudo):
        return labelled, record
    return concat([labelled, pseudo], f"{labelled.name} + {pseudo.name}"), record


def with_masks(source: ImageSource) -> ImageSource:
    """`source` without the images that have no instance mask (nothing to prompt)."""
    kept = [i for i, it in enumerate(source.items) if it.target["masks"]]
    if not kept:
        raise UsageError(f"'{source.name}' has no image with an instance mask to train on")
    if len(kept) < len(source):
        log(f"{len(source) - len(kept)} image(s) of '{source.name}' have no instance mask: left out")
    return subset(source, kept)


def _count(source: ImageSource) -> int:
    return sum(len(it.target["masks"]) for it in source.items)
