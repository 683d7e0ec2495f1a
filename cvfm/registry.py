"""The model registry: one id namespace across sources, one door (`create_encoder`).

Ids name their source:
  cvfm/<preset>     built-in tiny models for CPU runs (random init, seeded)
  timm/<arch>[.tag] any timm model; pretrained weights when asked and reachable
  hf/<repo-id>      a transformers vision backbone (DINOv2, ViT, ...) or image-text model (CLIP, SigLIP)
  <folder>          a cvfm run folder, a timm export (config.json with "architecture")
                    or a transformers `save_pretrained` folder (config.json with "model_type")

Image-text models (`create_dual_encoder`) are `cvfm/tiny-clip`, `hf/<clip-like repo>` and folders that
hold one; `create_encoder` on them returns their image tower.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cvfm.data.views import Preprocess
from cvfm.errors import CvfmError, UsageError
from cvfm.models.dual import DualEncoder, HFDualEncoder, is_dual_model
from cvfm.models.encoder import Encoder, HFEncoder, TimmEncoder, check_loading_info, read_preprocess


@dataclass(frozen=True)
class Preset:
    arch: str
    kwargs: dict = field(default_factory=dict)
    size: int = 32
    description: str = ""


# At 32 px a stride-32 ResNet ends on a 1x1 map; stride 16 keeps 2x2. Zero-initialised residual branches
# (timm's default) make a random-init encoder a near-constant function, a useless baseline.
_SMALL_INPUT = {"output_stride": 16, "zero_init_last": False}

_SMALL_PREPROCESS = Preprocess(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)

PRESETS: dict[str, Preset] = {
    "cvfm/tiny-resnet": Preset(
        "resnet18",
        {**_SMALL_INPUT, "channels": (16, 32, 64, 128), "stem_width": 16, "layers": (1, 1, 1, 1)},
        32,
        "0.3M-param ResNet (one basic block per stage, widths 16-128) for CPU demos at 32 px",
    ),
    "cvfm/small-resnet": Preset(
        "resnet18",
        {**_SMALL_INPUT, "channels": (32, 64, 128, 256), "stem_width": 32, "layers": (1, 1, 1, 1)},
        32,
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
        32,
        "0.5M-param ViT (patch 4, dim 96, depth 4) at 32 px",
    ),
}


def list_models(pattern: str = "*", *, sources: tuple[str, ...] = ("cvfm",)) -> list[dict]:
    """Registry entries whose id matches the glob `pattern`; `sources` may add "timm" (all timm archs)."""
    rows = [
        {
            "id": "cvfm/pixels",
            "source": "cvfm",
            "arch": "pixels",
            "kind": "image",
            "input_size": 32,
            "description": "raw-pixel baseline (the normalised 32x32 image, flattened)",
        }
    ]
    rows += [
        {
            "id": k,
            "source": "cvfm",
            "arch": p.arch,
            "kind": "image",
            "input_size": p.size,
            "description": p.description,
        }
        for k, p in PRESETS.items()
    ]
    rows.append(
        {
            "id": TINY_CLIP,
            "source": "cvfm",
            "arch": "clip",
            "kind": "image-text",
            "input_size": 32,
            "description": "image-text CLIPModel (ViT and text transformer, width 64, 2 layers) at 32 px",
        }
    )
    if "timm" in sources:
        import timm

        rows += [
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
    return [r for r in rows if fnmatch.fnmatch(r["id"], pattern)]


def create_encoder(
    model_id: str, *, pretrained: bool = True, trust_remote_code: bool = False, **overrides
) -> Encoder:
    """Build the image encoder named by `model_id` (see module docstring)."""
    path = Path(model_id)
    if model_id == "cvfm/pixels":
        from cvfm.models.pixels import PixelEncoder

        return PixelEncoder(**overrides)
    if model_id in PRESETS:
        p = PRESETS[model_id]
        return _timm(
            p.arch,
            model_id,
            False,
            {**p.kwargs, **overrides},
            _SMALL_PREPROCESS,
        )
    if model_id == TINY_CLIP:
        return create_dual_encoder(model_id).image_encoder()
    if model_id.startswith("cvfm/"):
        raise UsageError(f"unknown preset '{model_id}'{_suggest(model_id, [*PRESETS, TINY_CLIP])}")
    if model_id.startswith("timm/"):
        return _timm(model_id.removeprefix("timm/"), model_id, pretrained, overrides, None)
    if model_id.startswith("hf/"):
        return _hf(model_id.removeprefix("hf/"), model_id, pretrained, trust_remote_code)
    if path.is_dir():
        return _local(path, model_id, pretrained, trust_remote_code)
    raise UsageError(f"unknown model '{model_id}': use cvfm/<preset>, timm/<arch>, hf/<repo-id> or a folder")


TINY_CLIP = "cvfm/tiny-clip"


def create_dual_encoder(
    model_id: str, *, pretrained: bool = True, trust_remote_code: bool = False
) -> DualEncoder:
    """Build the image-text model named by `model_id`: `cvfm/tiny-clip`, `hf/<repo>` or a folder."""
    if model_id == TINY_CLIP:
        from cvfm.models.tiny_clip import build_tiny_clip

        model, tokenizer = build_tiny_clip()
        return HFDualEncoder(model, tokenizer, model_id, _SMALL_PREPROCESS)
    if model_id.startswith("hf/"):
        return _hf_dual(model_id.removeprefix("hf/"), model_id, pretrained, trust_remote_code)
    path = Path(model_id)
    if path.is_dir():
        if (path / "backbone").is_dir():  # a cvfm run folder
            return create_dual_encoder(
                str(path / "backbone"), pretrained=pretrained, trust_remote_code=trust_remote_code
            )
        if (path / "config.json").exists() and "model_type" in json.loads((path / "config.json").read_text()):
            return _hf_dual(str(path), model_id, pretrained, trust_remote_code)
        raise UsageError(f"folder '{path}' holds no image-text model")
    raise UsageError(
        f"'{model_id}' is not an image-text model id: use {TINY_CLIP}, hf/<clip-like repo> or a folder"
    )


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f" (did you mean: {', '.join(close)}?)" if close else ""


def _offline_hint(model_id: str, e: Exception) -> CvfmError:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return UsageError(
            f"'{model_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it"
        )
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return CvfmError(f"cannot load '{model_id}': {first}")


def _timm(arch: str, name: str, pretrained: bool, kwargs: dict, preprocess: Preprocess | None) -> TimmEncoder:
    import timm

    base = arch.split(".")[0]
    if not timm.is_model(base) and not arch.startswith("hf-hub:"):
        raise UsageError(f"timm has no model '{base}'{_suggest(base, timm.list_models())}")
    try:
        model = timm.create_model(arch, pretrained=pretrained, num_classes=0, **kwargs)
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        raise _offline_hint(name, e) from None
    return TimmEncoder(model, name, base, kwargs, preprocess)


def _hf_model(repo: str, name: str, pretrained: bool, trust_remote_code: bool):
    """A transformers AutoModel from the hub or a folder; weights must match the architecture."""
    from transformers import AutoConfig, AutoModel

    try:
        if pretrained:
            model, info = AutoModel.from_pretrained(
                repo,
                output_loading_info=True,
                use_safetensors=True,
                ignore_mismatched_sizes=True,  # reported, then refused
                trust_remote_code=trust_remote_code,
            )
            check_loading_info(info, name)
        else:
            config = AutoConfig.from_pretrained(repo, trust_remote_code=trust_remote_code)
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if Path(repo).is_dir():
            raise CvfmError(f"cannot load transformers model from '{repo}': {e}") from None
        raise _offline_hint(name, e) from None
    preprocess = read_preprocess(Path(repo)) if Path(repo).is_dir() else None
    return model, preprocess or _hf_preprocess(repo, model, trust_remote_code)


def _hf(repo: str, name: str, pretrained: bool, trust_remote_code: bool) -> Encoder:
    model, preprocess = _hf_model(repo, name, pretrained, trust_remote_code)
    if is_dual_model(model):
        return HFDualEncoder(
            model, _hf_tokenizer(repo, name, trust_remote_code), name, preprocess
        ).image_encoder()
    return HFEncoder(model, name, preprocess)


def _hf_dual(repo: str, name: str, pretrained: bool, trust_remote_code: bool) -> HFDualEncoder:
    model, preprocess = _hf_model(repo, name, pretrained, trust_remote_code)
    if not is_dual_model(model):
        raise UsageError(f"'{name}' is an image-only model ({type(model).__name__}): it has no text tower")
    return HFDualEncoder(model, _hf_tokenizer(repo, name, trust_remote_code), name, preprocess)


def _hf_tokenizer(repo: str, name: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(repo, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _offline_hint(name, e) from None


def _hf_preprocess(repo: str, model, trust_remote_code: bool) -> Preprocess:
    """Size and normalisation from the repo's image processor, else from the model config."""
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(repo, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        proc = None
    size = getattr(model.config, "image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else int(size)
    if proc is None:
        return Preprocess(size=size)
    crop = getattr(proc, "crop_size", None) or getattr(proc, "size", None) or {}
    crop_side = crop.get("height") or crop.get("shortest_edge") or size
    resize = getattr(proc, "size", None) or {}
    short = resize.get("shortest_edge") or resize.get("height") or crop_side
    return Preprocess(
        size=int(crop_side),
        mean=tuple(proc.image_mean),
        std=tuple(proc.image_std),
        crop_pct=float(crop_side) / float(short),
    )


def _local(path: Path, name: str, pretrained: bool, trust_remote_code: bool) -> Encoder:
    """A folder's architecture, with its weights unless `pretrained=False` (a random-init baseline)."""
    if (path / "backbone").is_dir():  # a cvfm run folder
        return _local(path / "backbone", name, pretrained, trust_remote_code)
    config_file = path / "config.json"
    if not config_file.exists():
        raise UsageError(f"folder '{path}' holds no model (no config.json, no backbone/ sub-folder)")
    config = json.loads(config_file.read_text())
    if "architecture" in config:  # timm's own export layout
        if not any(path.glob("*.safetensors")):
            raise UsageError(f"folder '{path}' has no .safetensors weights (cvfm reads no pickle files)")
        return TimmEncoder.load(path, name, weights=pretrained)
    if "model_type" in config:
        return _hf(str(path), name, pretrained, trust_remote_code)
    raise UsageError(f"folder '{path}' has a config.json that is neither a timm nor a transformers model")
