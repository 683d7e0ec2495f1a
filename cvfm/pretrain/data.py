"""The training data of a `cvfm pretrain` run: the source with one text per image for a text method, its
classes for a labelled one, and the ids `--exclude` / `--ledger` leave out (run.json records how many and a
hash of them; a resumed run refuses to go on if that set has changed)."""

from __future__ import annotations

from cvfm.data.exclude import exclude_from
from cvfm.data.sources import ImageSource, open_source
from cvfm.errors import CvfmError, UsageError
from cvfm.models.classifier import labelled_classes
from cvfm.pretrain.config import PretrainConfig
from cvfm.runtime.progress import log
from cvfm.runtime.run_dir import RunDir


def open_training_data(
    cfg: PretrainConfig, run: RunDir | None, *, texts: bool, labels: bool, quiet: bool = False
) -> tuple[ImageSource, list[str] | None, dict | None]:
    """(source without the excluded ids, its classes when `labels`, run.json's "excluded" record). A
    resumed `run` must leave out what it left out before; `quiet`: no log line about the excluded ids."""
    source = _open_source(cfg, texts)
    classes = labelled_classes(source, cfg.data) if labels else None
    source, excluded = _exclude(cfg, source, run, quiet)
    return source, classes, excluded


def _open_source(cfg: PretrainConfig, texts: bool) -> ImageSource:
    """The training data, with one text per image for a text method (refused clearly otherwise)."""
    common = dict(split=cfg.split, image_column=cfg.image_column, label_column=cfg.label_column)
    if not texts:
        return open_source(cfg.data, strict=cfg.strict, **common)
    column = cfg.text_column
    try:
        source = open_source(cfg.data, text_column=column, strict=cfg.strict, **common)
    except UsageError as original:
        # A manifest whose lines all lack the text field ends up empty ("holds no images"): say why.
        if not cfg.data.endswith(".jsonl"):
            raise
        try:
            open_source(cfg.data, **common)
        except CvfmError:
            raise original from None
        raise UsageError(_no_texts(cfg, column)) from None
    if not source.has_texts:
        raise UsageError(_no_texts(cfg, column))
    lists = [it.id for it in source.items if not isinstance(it.text, str)]
    if lists:
        raise UsageError(
            f"{len(lists)} record(s) of '{cfg.data}' hold a list of texts in '{column}' (first: {lists[0]}): "
            f"--method {cfg.method} pairs each image with one text; write one record per (image, text) pair"
        )
    return source


def _no_texts(cfg: PretrainConfig, column: str) -> str:
    return (
        f"--method {cfg.method} trains on image-text pairs, but '{cfg.data}' has no text in '{column}' "
        "(name the field or column with --text-column)"
    )


def _exclude(
    cfg: PretrainConfig, source: ImageSource, run: RunDir | None, quiet: bool
) -> tuple[ImageSource, dict | None]:
    """The training source without the ids of `cfg.exclude` and `cfg.ledger`, and run.json's record of
    them; a resumed run must leave out exactly what it left out before."""
    if not (cfg.exclude or cfg.ledger):
        return source, None
    source, record = exclude_from(source, cfg.exclude, cfg.ledger)
    if cfg.resume and run is not None:
        before = (run.read().get("excluded") or {}).get("sha256")
        if before is not None and before != record["sha256"]:
            raise UsageError(
                f"cannot resume '{run.path}': the ids left out (--exclude / --ledger) changed since it "
                f"started ({record['count']} now); start a new run instead"
            )
    if quiet:
        return source, record
    sources = " and ".join(
        f"{k} '{v}'" for k, v in (("--exclude", cfg.exclude), ("--ledger", cfg.ledger)) if v
    )
    log(f"left out {record['count']} training image(s) ({sources}: {record['requested']} id(s))")
    return source, record
