"""The built-in `cvfm/<preset>` models: tiny random-init (seeded) models for CPU runs at 32 px, one table
row each."""

from __future__ import annotations

from dataclasses import dataclass, field

from cvfm.data.preprocess import Preprocess
from cvfm.models.blip import Captioner, Matcher
from cvfm.models.detector import Detector
from cvfm.models.dual import HFDualEncoder
from cvfm.models.encoder import Encoder
from cvfm.models.segmenter import Segmenter
from cvfm.registry.source import (
    CAPTIONER,
    DETECTOR,
    IMAGE,
    IMAGE_TEXT,
    MATCHER,
    SEGMENTER,
    Loader,
    Request,
    Source,
    image_tower,
)
from cvfm.registry.timm_models import timm_encoder

PREFIX = "cvfm/"


@dataclass(frozen=True)
class Preset:
    """A timm architecture at small sizes (`kwargs` for `timm.create_model`), for 32 px input."""

    arch: str
    kwargs: dict = field(default_factory=dict)
    description: str = ""


# At 32 px a stride-32 ResNet ends on a 1x1 map; stride 16 keeps 2x2. Zero-initialised residual branches
# (timm's default) make a random-init encoder a near-constant function, a useless baseline.
_SMALL_INPUT = {"output_stride": 16, "zero_init_last": False}

SMALL_PREPROCESS = Preprocess(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)

PRESETS: dict[str, Preset] = {
    "cvfm/tiny-resnet": Preset(
        "resnet18",
        {**_SMALL_INPUT, "channels": (16, 32, 64, 128), "stem_width": 16, "layers": (1, 1, 1, 1)},
        "0.3M-param ResNet (one basic block per stage, widths 16-128) for CPU demos at 32 px",
    ),
    "cvfm/small-resnet": Preset(
        "resnet18",
        {**_SMALL_INPUT, "channels": (32, 64, 128, 256), "stem_width": 32, "layers": (1, 1, 1, 1)},
        "1.2M-param ResNet (widths 32-256) at 32 px",
    ),
    "cvfm/tiny-vit": Preset(
        "vit_tiny_patch16_224",
        {
            "img_size": 32,
            "patch_size": 4,
            "embed_dim": 96,
            "depth": 4,
            "num_heads": 3,
            "dynamic_img_size": True,
        },
        "0.5M-param ViT (patch 4, dim 96, depth 4) at 32 px",
    ),
}


def _pixels(ref: str, request: Request) -> Encoder:
    from cvfm.models.pixels import PixelEncoder

    return PixelEncoder(**request.overrides)


def _timm_preset(ref: str, request: Request) -> Encoder:
    p = PRESETS[ref]
    return timm_encoder(p.arch, request.model_id, False, {**p.kwargs, **request.overrides}, SMALL_PREPROCESS)


def _tiny_clip(ref: str, request: Request) -> HFDualEncoder:
    from cvfm.models.tiny_clip import build_tiny_clip

    model, tokenizer = build_tiny_clip()
    return HFDualEncoder(model, tokenizer, request.model_id, SMALL_PREPROCESS)


def _tiny_blip(face):
    """A loader of the tiny BLIP model behind `face` (Captioner or Matcher)."""

    def load(ref: str, request: Request):
        from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

        from cvfm.models.tiny_blip import build_tiny_blip, build_tokenizer

        model_cls = BlipForConditionalGeneration if face is Captioner else BlipForImageTextRetrieval
        return face(build_tiny_blip(model_cls), build_tokenizer(), request.model_id, SMALL_PREPROCESS)

    return load


def _tiny_sam(ref: str, request: Request) -> Segmenter:
    from cvfm.models.tiny_sam import PREPROCESS, build_tiny_sam

    return Segmenter(build_tiny_sam(), request.model_id, PREPROCESS)


def _tiny_sam2(ref: str, request: Request) -> Segmenter:
    from cvfm.models.tiny_sam import PREPROCESS_SAM2, build_tiny_sam2

    return Segmenter(build_tiny_sam2(), request.model_id, PREPROCESS_SAM2)


def _tiny_owlv2(ref: str, request: Request) -> Detector:
    from cvfm.models.tiny_owl import build_tiny_owlv2

    return Detector(*build_tiny_owlv2(), request.model_id)


def _preset(
    model_id: str,
    kind: str,
    arch: str,
    description: str,
    loaders: dict[str, Loader],
    overrides: bool = False,
    input_size: int = 32,
) -> Source:
    """The table row of preset `model_id`; `kind` is its `cvfm models` kind column."""
    row = {"id": model_id, "source": "cvfm", "arch": arch, "kind": kind, "input_size": input_size}
    row["description"] = description
    return Source(
        "cvfm", model_id, loaders, prefix=model_id, exact=True, overrides=overrides, listing=lambda _: [row]
    )


SOURCES: tuple[Source, ...] = (
    _preset(
        "cvfm/pixels",
        "image",
        "pixels",
        "raw-pixel baseline (the normalised 32x32 image, flattened)",
        {IMAGE: _pixels},
        overrides=True,
    ),
    *(_preset(k, "image", p.arch, p.description, {IMAGE: _timm_preset}, True) for k, p in PRESETS.items()),
    _preset(
        "cvfm/tiny-clip",
        "image-text",
        "clip",
        "image-text CLIPModel (ViT patch 8, text transformer; width 128, 2 layers), 32 px",
        {IMAGE_TEXT: _tiny_clip, IMAGE: image_tower(_tiny_clip)},
    ),
    _preset(
        "cvfm/tiny-blip",
        "captioner+matcher",
        "blip",
        "BLIP captioner and image-text matcher (ViT patch 8, BERT text, width 128), 32 px",
        {CAPTIONER: _tiny_blip(Captioner), MATCHER: _tiny_blip(Matcher)},
    ),
    _preset(
        "cvfm/tiny-sam",
        "segmenter",
        "sam",
        "promptable segmenter SamModel (ViT patch 8, width 48, 2 layers; 0.1M parameters), 128 px",
        {SEGMENTER: _tiny_sam},
        input_size=128,
    ),
    _preset(
        "cvfm/tiny-sam2",
        "segmenter",
        "sam2",
        "promptable segmenter Sam2Model (Hiera widths 16-128, 6 blocks; 0.4M parameters), 128 px",
        {SEGMENTER: _tiny_sam2},
        input_size=128,
    ),
    _preset(
        "cvfm/tiny-owlv2",
        "detector",
        "owlv2",
        "open-vocabulary detector Owlv2ForObjectDetection (ViT patch 8, width 32, 1 layer; CLIP text), 64 px",
        {DETECTOR: _tiny_owlv2},
        input_size=64,
    ),
)
