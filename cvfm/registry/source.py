"""What one row of the registry's table is: a `Source` (how its ids or folders are recognised, a loader per
model kind, what `cvfm models` lists of it) and the `Request` its loaders receive.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

# Model kinds: the keys of `Source.loaders`, one per `create_*` door.
IMAGE = "image"  # an `Encoder`
IMAGE_TEXT = "image-text"  # a `DualEncoder`
CLASSIFIER = "classifier"  # a `Classifier`
CAPTIONER = "captioner"  # a BLIP `Captioner`
MATCHER = "matcher"  # a BLIP `Matcher`
SEGMENTER = "segmenter"  # a SAM-family `Segmenter`
DETECTOR = "detector"  # an open-vocabulary `Detector` (OWL-ViT, OWLv2, Grounding DINO)


@dataclass(frozen=True)
class Request:
    """What a door was asked for: a model of `kind` named `model_id` (its name, and the id in messages).

    `load` is the registry's own door, for loaders whose model holds others (a run folder, a classifier's
    backbone, a paired encoder's parts): `request.load(ref)` loads `ref` (an id or folder) as this request."""

    kind: str
    model_id: str
    opener: Callable[[Request, str], Any]
    pretrained: bool = True
    trust_remote_code: bool = False
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def load(self, ref: str | Path, kind: str | None = None, model_id: str | None = None) -> Any:
        """`ref` through the registry, as `kind` (default: this request's), named `model_id` (default:
        this request's), with this request's `pretrained` and `trust_remote_code` and no overrides."""
        again = replace(self, kind=kind or self.kind, model_id=model_id or self.model_id, overrides={})
        return self.opener(again, str(ref))


# A loader builds the model from `ref`: the id without the source's prefix, or the folder's path.
Loader = Callable[[str, Request], Any]


@dataclass(frozen=True)
class Source:
    """One row of the table: ids `<prefix><ref>` (or exactly `prefix`, for a preset), or folders that
    `holds` recognises; `loaders` maps each model kind it gives to its loader."""

    name: str  # `cvfm models`' source column ("cvfm", "timm", ...); "folder" for a folder layout
    ids: str  # how its ids look ("timm/<arch>") or what its folders hold, for messages
    loaders: Mapping[str, Loader]
    prefix: str = ""
    exact: bool = False  # the id is `prefix` itself (a preset)
    holds: Callable[[Path], bool] | None = None  # a folder layout: whether a folder is one
    overrides: bool = False  # takes keyword overrides of the architecture (`create_encoder(id, depth=2)`)
    listing: Callable[[str], list[dict]] | None = None  # `cvfm models` rows (given the glob pattern)

    def match(self, model_id: str) -> str | None:
        """The ref of `model_id` when it is one of this source's ids, else None (folders: see `holds`)."""
        if not self.prefix:
            return None
        if self.exact:
            return model_id if model_id == self.prefix else None
        return model_id.removeprefix(self.prefix) if model_id.startswith(self.prefix) else None


def image_tower(load_dual: Loader) -> Loader:
    """The image encoder of the dual encoder that `load_dual` builds (its pooled output: the image
    embedding)."""
    return lambda ref, request: load_dual(ref, request).image_encoder()


def inside(sub: str) -> Loader:
    """The model in the sub-folder `sub` (a run folder's backbone/ or classifier/), named as asked."""
    return lambda ref, request: request.load(Path(ref) / sub)


def config_json(folder: Path) -> dict:
    """A folder's config.json as a dict ({} when missing or unreadable): what tells timm and transformers
    folders apart."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}
