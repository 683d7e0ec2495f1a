"""The labelled training data of a fine-tuning run, without the ids it leaves out."""

from __future__ import annotations

from cvfm.data.exclude import exclude_from
from cvfm.data.sources import ImageSource, open_source
from cvfm.finetune.config import FinetuneConfig
from cvfm.models.classifier import labelled_classes
from cvfm.runtime.progress import log


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
