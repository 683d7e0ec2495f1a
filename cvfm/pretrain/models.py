"""The model a method trains, built from `--model` (and `--text-model`) by the method's `model_kind`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cvfm.errors import CvfmError, UsageError
from cvfm.models.classifier import Classifier, LinearHead
from cvfm.models.dual import ImageTower
from cvfm.models.paired import PairedEncoder
from cvfm.pretrain.config import PretrainConfig
from cvfm.registry import create_captioner, create_dual_encoder, create_encoder, create_matcher


def build_model(cfg: PretrainConfig, kind: str, classes: list[str] | None = None) -> nn.Module:
    """The model of `kind` (`Method.model_kind`), from the seeded global RNG where it starts random."""
    return BUILDERS[kind](cfg, classes)


def _image(cfg: PretrainConfig, classes) -> nn.Module:
    return create_encoder(cfg.model, pretrained=cfg.pretrained)


def _classifier(cfg: PretrainConfig, classes: list[str]) -> Classifier:
    """The `--model` encoder and a linear head over `classes`."""
    encoder = create_encoder(cfg.model, pretrained=cfg.pretrained)
    head = LinearHead(encoder.num_features, len(classes))
    return Classifier(encoder, head, classes, frozen=False, backbone=cfg.model)


def _blip(kind: str) -> Callable:
    """BLIP fine-tuning: the `--model` captioner or matcher with its weights (the registry's pretrained
    ones, a folder's or a run's; cvfm/tiny-blip has none)."""
    create = create_captioner if kind == "captioner" else create_matcher

    def build(cfg: PretrainConfig, classes) -> nn.Module:
        try:
            return create(cfg.model, pretrained=True)
        except UsageError as e:
            raise UsageError(
                f"--method {cfg.method} fine-tunes a BLIP {kind} (cvfm/tiny-blip, hf/<BLIP repo>, or a "
                f"folder or run holding one), not '{cfg.model}': {e}"
            ) from None

    return build


def _dual(cfg: PretrainConfig, classes) -> nn.Module:
    """The dual encoder `--model`, or the `--model` image encoder paired with the text half of
    `--text-model`."""
    if cfg.text_model is not None:
        image = create_encoder(cfg.model, pretrained=cfg.pretrained)
        try:
            text = create_dual_encoder(cfg.text_model, pretrained=cfg.pretrained)
        except UsageError as e:
            raise UsageError(f"--text-model must be an image-text model with a text tower: {e}") from None
        return PairedEncoder(image, text, name=f"{cfg.model}+{cfg.text_model}")
    try:
        return create_dual_encoder(cfg.model, pretrained=cfg.pretrained)
    except UsageError as e:
        try:  # does it build as an image-only model? Then say how to give it a text tower.
            image = create_encoder(cfg.model, pretrained=cfg.pretrained)
        except CvfmError:
            image = None
        if image is None or isinstance(image, ImageTower):
            raise UsageError(
                f"--method {cfg.method} trains an image-text model with a text tower: {e}"
            ) from None
        raise UsageError(
            f"--method {cfg.method} trains an image-text model, and '{cfg.model}' is an image encoder with "
            "no text tower: pair it with one, e.g. --text-model cvfm/tiny-clip"
        ) from None


BUILDERS: dict[str, Callable[[PretrainConfig, list[str] | None], nn.Module]] = {
    "image": _image,
    "classifier": _classifier,
    "captioner": _blip("captioner"),
    "matcher": _blip("matcher"),
    "dual": _dual,
}
