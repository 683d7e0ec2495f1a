"""timm models: `timm/<arch>[.tag]` ids (pretrained weights when asked and reachable) and timm's own export
folders (config.json with "architecture", safetensors weights)."""

from __future__ import annotations

from pathlib import Path

from cvfm.data.preprocess import Preprocess
from cvfm.errors import UsageError
from cvfm.models.encoder import TimmEncoder
from cvfm.registry.hints import offline_hint, suggest
from cvfm.registry.source import Request, config_json


def timm_encoder(
    arch: str, name: str, pretrained: bool, kwargs: dict, preprocess: Preprocess | None = None
) -> TimmEncoder:
    """timm's `arch` without its classifier (`kwargs` for `timm.create_model`), named `name`."""
    import timm

    base = arch.split(".")[0]
    if not timm.is_model(base) and not arch.startswith("hf-hub:"):
        raise UsageError(f"timm has no model '{base}'{suggest(base, timm.list_models())}")
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=0, **kwargs)
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise offline_hint(name, e) from None
    return TimmEncoder(model, name, base, kwargs, preprocess)


def load_arch(arch: str, request: Request) -> TimmEncoder:
    return timm_encoder(arch, request.model_id, request.pretrained, dict(request.overrides))


def is_export(folder: Path) -> bool:
    return "architecture" in config_json(folder)


def load_export(folder: str, request: Request) -> TimmEncoder:
    """A timm export folder, with its weights unless `pretrained=False` (a random-init baseline)."""
    if not any(Path(folder).glob("*.safetensors")):
        raise UsageError(f"folder '{folder}' has no .safetensors weights (cvfm reads no pickle files)")
    return TimmEncoder.load(Path(folder), request.model_id, weights=request.pretrained)


def rows(pattern: str) -> list[dict]:
    """Every timm architecture; with a '.' in the pattern, every pretrained `<arch>.<tag>`."""
    import timm

    return [
        {
            "id": f"timm/{n}",
            "source": "timm",
            "arch": n.split(".")[0],
            "kind": "image",
            "input_size": None,
            "description": "timm model",
        }
        for n in timm.list_models(pretrained="." in pattern)
    ]
