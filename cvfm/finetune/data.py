"""The labelled training data of a fine-tuning run, without the ids it leaves out: opened as its `cvfm
pretrain` run of the `supervised` method opens it."""

from __future__ import annotations

from cvfm.data.sources import ImageSource
from cvfm.finetune.config import FinetuneConfig, pretrain_config
from cvfm.pretrain.data import open_training_data as open_run_data


def open_training_data(
    cfg: FinetuneConfig, quiet: bool = False
) -> tuple[ImageSource, list[str], dict | None]:
    """The labelled training source without the excluded ids, the class names of the whole source, and
    run.json's "excluded" record (None when nothing is excluded); `quiet`: no log line about them."""
    return open_run_data(pretrain_config(cfg), None, texts=False, labels=True, quiet=quiet)
