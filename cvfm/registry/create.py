"""The registry's doors: one `create_*` per model kind and `list_models`, all reading `table.SOURCES`."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

from cvfm.errors import UsageError
from cvfm.models.blip import Captioner, Matcher
from cvfm.models.classifier import Classifier
from cvfm.models.detector import Detector
from cvfm.models.dual import DualEncoder
from cvfm.models.encoder import Encoder
from cvfm.models.segmenter import Segmenter
from cvfm.registry.hints import suggest
from cvfm.registry.presets import PREFIX as PRESET_PREFIX
from cvfm.registry.source import (
    CAPTIONER,
    CLASSIFIER,
    DETECTOR,
    IMAGE,
    IMAGE_TEXT,
    MATCHER,
    SEGMENTER,
    Request,
    Source,
)
from cvfm.registry.table import SOURCES

_A_KIND = {
    IMAGE: "an image encoder",
    IMAGE_TEXT: "an image-text model",
    CLASSIFIER: "a classifier",
    CAPTIONER: "a captioner",
    MATCHER: "a matcher",
    SEGMENTER: "a segmenter",
    DETECTOR: "an open-vocabulary detector",
}


def create_encoder(
    model_id: str, *, pretrained: bool = True, trust_remote_code: bool = False, **overrides
) -> Encoder:
    """The image encoder named by `model_id` (see `cvfm.registry`); `overrides` change a timm or preset
    architecture (`depth=2`). An image-text model gives its image tower; a classifier, its backbone."""
    return _open(Request(IMAGE, model_id, _open, pretrained, trust_remote_code, overrides), model_id)


def create_dual_encoder(
    model_id: str, *, pretrained: bool = True, trust_remote_code: bool = False
) -> DualEncoder:
    """The image-text model named by `model_id`: `cvfm/tiny-clip`, `hf/<repo>`, `open_clip/...` or a folder
    (a transformers folder wins over an open_clip one when a folder holds both)."""
    return _open(Request(IMAGE_TEXT, model_id, _open, pretrained, trust_remote_code), model_id)


def create_classifier(model_id: str) -> Classifier:
    """The classifier in folder `model_id` (classifier.json), or in its classifier/ sub-folder (a
    `cvfm finetune` run or a `cvfm unlearn` output)."""
    return _open(Request(CLASSIFIER, model_id, _open), model_id)


def create_captioner(model_id: str, *, pretrained: bool = True, trust_remote_code: bool = False) -> Captioner:
    """A BLIP captioner: `cvfm/tiny-blip`, `hf/<repo>` (BlipForConditionalGeneration) or a folder."""
    return _open(Request(CAPTIONER, model_id, _open, pretrained, trust_remote_code), model_id)


def create_matcher(model_id: str, *, pretrained: bool = True, trust_remote_code: bool = False) -> Matcher:
    """A BLIP image-text matcher (ITM + ITC heads): `cvfm/tiny-blip`, `hf/<repo>`
    (BlipForImageTextRetrieval) or a folder."""
    return _open(Request(MATCHER, model_id, _open, pretrained, trust_remote_code), model_id)


def create_segmenter(model_id: str, *, pretrained: bool = True, trust_remote_code: bool = False) -> Segmenter:
    """A promptable segmenter (SAM, SAM-HQ): `cvfm/tiny-sam`, `hf/<repo>` (e.g. hf/facebook/sam-vit-base)
    or a folder (`save_pretrained`, a cvfm run)."""
    return _open(Request(SEGMENTER, model_id, _open, pretrained, trust_remote_code), model_id)


def create_detector(model_id: str, *, pretrained: bool = True, trust_remote_code: bool = False) -> Detector:
    """An open-vocabulary detector with its processor: `cvfm/tiny-owlv2`, `hf/<repo>` (OWL-ViT, OWLv2,
    Grounding DINO, e.g. hf/google/owlv2-base-patch16-ensemble) or a `save_pretrained` folder."""
    return _open(Request(DETECTOR, model_id, _open, pretrained, trust_remote_code), model_id)


def list_models(pattern: str = "*", *, sources: tuple[str, ...] = ("cvfm",)) -> list[dict]:
    """Registry entries whose id matches the glob `pattern`; `sources` may add "timm" (all timm archs)
    and "open_clip" (its architectures; with a ':' in the pattern, its pretrained `<arch>:<tag>` ids)."""
    rows = [row for s in SOURCES if s.listing and s.name in sources for row in s.listing(pattern)]
    return [r for r in rows if fnmatch.fnmatch(r["id"], pattern)]


def _open(request: Request, ref: str) -> Any:
    """Build `request.kind` from `ref` (an id, or a folder) with the loader of its row in the table."""
    source, rest = _find(ref)
    if source is None:
        folders = _either(_folders(request.kind))
        if Path(ref).is_dir():
            raise UsageError(f"folder '{ref}' holds no model: expected {folders}")
        if _ids(request.kind):
            raise UsageError(f"unknown model '{ref}': use {_alternatives(request.kind)}")
        what = "is not a folder" if Path(ref).exists() else "does not exist"
        raise UsageError(f"'{ref}' {what}: expected {folders}")
    loader = source.loaders.get(request.kind)
    if loader is None:
        what = source.ids if source.holds else f"a {source.name} {'preset' if source.exact else 'model'}"
        raise UsageError(f"'{ref}' is {what}, not {_A_KIND[request.kind]}: use {_alternatives(request.kind)}")
    if request.overrides and not source.overrides:
        who = f"{source.name} models take" if source.prefix and not source.exact else f"'{ref}' takes"
        raise UsageError(f"{who} no overrides (got: {', '.join(request.overrides)})")
    return loader(rest, request)


def _find(ref: str) -> tuple[Source | None, str]:
    """The row of `ref` and what its loader reads: the id's rest after the prefix, or the folder."""
    for source in SOURCES:
        rest = source.match(ref)
        if rest is not None:
            return source, rest
    if ref.startswith(PRESET_PREFIX):
        presets = [s.prefix for s in SOURCES if s.exact]
        raise UsageError(f"unknown preset '{ref}'{suggest(ref, presets)}")
    if Path(ref).is_dir():
        for source in SOURCES:
            if source.holds and source.holds(Path(ref)):
                return source, ref
    return None, ref


def _alternatives(kind: str) -> str:
    """What gives `kind`, as messages show it: "cvfm/tiny-clip, hf/<repo-id> ... or a folder"."""
    ids = _ids(kind)
    if not ids:
        return _either(_folders(kind))
    return f"{', '.join(ids)} or a folder" if _folders(kind) else _either(ids)


def _ids(kind: str) -> list[str]:
    """The ids that give `kind`: a few presets by name (else cvfm/<preset>), then each prefix's form."""
    presets = [s.prefix for s in SOURCES if s.exact and kind in s.loaders]
    ids = presets if len(presets) <= 2 else [f"{PRESET_PREFIX}<preset>"]
    return ids + [s.ids for s in SOURCES if s.prefix and not s.exact and kind in s.loaders]


def _folders(kind: str) -> list[str]:
    return [s.ids for s in SOURCES if s.holds and kind in s.loaders]


def _either(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
