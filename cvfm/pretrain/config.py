"""`cvfm pretrain`'s configuration: the loop's settings plus the data, method and model, as run.json keeps
them ("config"); and what a method fills in when left out (its default model, the text column)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from cvfm.data.builtin import CAPTIONED
from cvfm.errors import UsageError
from cvfm.methods import method_class
from cvfm.runtime.plan import TrainSettings
from cvfm.runtime.run_dir import resumed_config


@dataclass(kw_only=True)
class PretrainConfig(TrainSettings):
    data: str
    output: str
    method: str = "dino"
    model: str | None = None  # registry id; default: the method's (cvfm/tiny-resnet, clip: cvfm/tiny-clip)
    # clip: an image-text model whose text half is paired with the image encoder `model` (PairedEncoder)
    text_model: str | None = None
    pretrained: bool = False  # start from the registry's pretrained weights instead of random init
    split: str | None = None
    image_column: str = "image"
    label_column: str | None = None
    text_column: str | None = None  # text methods only; default "caption" for builtin:*-captions, else "text"
    # A labelled source evaluated each epoch: zero-shot top-1 on its test split for a dual encoder when
    # it has prompt templates (captioned built-ins), else k-NN (train split = bank, test = queries).
    monitor: str | None = None
    monitor_size: int = 2000
    overwrite: bool = False
    options: dict = field(default_factory=dict)  # method options (--opt key=value)
    exclude: str | None = None  # a file of ids (one per line, or a .jsonl "id" per line) left out
    ledger: str | None = None  # a deletion ledger (cvfm unlearn): the ids it has forgotten are left out


def saved_config(cfg: PretrainConfig) -> PretrainConfig:
    """With `resume`, the run's own config from its run.json (`num_workers` may change); else `cfg` with
    the default number of workers filled in."""
    return resumed_config(cfg, "cvfm pretrain")


def resolve_defaults(cfg: PretrainConfig) -> PretrainConfig:
    """Fill in what depends on the method: the model id and, for text methods, the text column."""
    cls = method_class(cfg.method)
    text_column = cfg.text_column
    if cls.needs_text():
        text_column = text_column or default_text_column(cfg.data)
    elif text_column is not None:
        raise UsageError(
            f"--text-column is for methods that train on texts (clip, blip-*), not '{cfg.method}'"
        )
    if cls.model_kind in ("captioner", "matcher") and cfg.monitor:
        raise UsageError(f"--monitor evaluates image or dual encoders; --method {cfg.method} has none")
    if cfg.text_model is not None:
        if cls.model_kind != "dual":
            raise UsageError(f"--text-model is for methods that train on texts (clip), not '{cfg.method}'")
        if cfg.model is None:
            raise UsageError(
                "--text-model pairs its text tower with the image encoder named by --model: "
                "name one (e.g. --model cvfm/tiny-resnet)"
            )
    return replace(cfg, model=cfg.model or cls.default_model, text_column=text_column)


def default_text_column(data: str) -> str:
    """The text column of a data spec: "caption" for builtin:*-captions, else "text" (JSONL, HF)."""
    return "caption" if data.removeprefix("builtin:") in CAPTIONED else "text"
