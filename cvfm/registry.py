"""The model registry: one id namespace across sources, one door (`create_encoder`).

Ids name their source:
  cvfm/<preset>     built-in tiny models for CPU runs (random init, seeded)
  timm/<arch>[.tag] any timm model; pretrained weights when asked and reachable
  hf/<repo-id>      a transformers vision backbone (DINOv2, ViT, ...) or image-text model (CLIP, SigLIP)
  open_clip/<arch>[:<tag>]        an open_clip model, with the weights of a pretrained tag
  open_clip/hf-hub:<org>/<repo>   an open_clip model from the Hugging Face hub
  open_clip/local-dir:<folder>    an open_clip folder (open_clip_config.json + safetensors weights)
  <folder>          a cvfm run folder, a timm export (config.json with "architecture"),
                    a transformers `save_pretrained` folder (config.json with "model_type"),
                    an open_clip folder (open_clip_config.json) or a paired encoder (paired.json)

Classifiers (`create_classifier`: a backbone and a class head, as `cvfm finetune` and `cvfm unlearn` write
them) are folders with classifier.json, or run folders holding one in classifier/; `create_encoder` on
them returns the classifier's backbone.

Image-text models (`create_dual_encoder`) are `cvfm/tiny-clip`, `hf/<clip-like repo>`, `open_clip/...`
and folders that hold one, among them a `PairedEncoder` (any image encoder + a dual's text half, as
`pretrain --method clip --text-model` writes it); `create_encoder` on them returns their image tower.
"""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cvfm.data.preprocess import Preprocess, from_transformers
from cvfm.errors import CvfmError, UsageError
from cvfm.models.blip import Captioner, Matcher
from cvfm.models.classifier import Classifier, is_classifier_folder, load_classifier
from cvfm.models.dual import DualEncoder, HFDualEncoder, is_dual_model
from cvfm.models.encoder import Encoder, HFEncoder, TimmEncoder, check_loading_info, read_preprocess
from cvfm.models.openclip import CONFIG_FILE as OPEN_CLIP_CONFIG
from cvfm.models.openclip import WEIGHTS_FILE as OPEN_CLIP_WEIGHTS
from cvfm.models.openclip import OpenCLIPDualEncoder
from cvfm.models.paired import PairedEncoder, is_paired_folder


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
    """Registry entries whose id matches the glob `pattern`; `sources` may add "timm" (all timm archs)
    and "open_clip" (its architectures; with a ':' in the pattern, its pretrained `<arch>:<tag>` ids)."""
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
            "description": "image-text CLIPModel (ViT patch 8, text transformer; width 128, 2 layers), 32 px",
        }
    )
    rows.append(
        {
            "id": TINY_BLIP,
            "source": "cvfm",
            "arch": "blip",
            "kind": "captioner+matcher",
            "input_size": 32,
            "description": "BLIP captioner and image-text matcher (ViT patch 8, BERT text, width 128), 32 px",
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
    if "open_clip" in sources:
        rows += _open_clip_rows(tags=":" in pattern)
    return [r for r in rows if fnmatch.fnmatch(r["id"], pattern)]


def _open_clip_rows(tags: bool) -> list[dict]:
    open_clip = _import_open_clip()

    def row(arch: str, tag: str | None) -> dict:
        size = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {}).get("image_size")
        size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
        return {
            "id": f"{OPEN_CLIP}{arch}" + (f":{tag}" if tag else ""),
            "source": "open_clip",
            "arch": arch,
            "kind": "image-text",
            "input_size": size if isinstance(size, int) else None,
            "description": f"open_clip weights '{tag}'" if tag else "open_clip model (weights: add :<tag>)",
        }

    archs = open_clip.list_models()
    if tags:
        return [row(arch, tag) for arch, tag in open_clip.list_pretrained() if arch in archs]
    return [row(arch, None) for arch in archs]


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
    if model_id.startswith(OPEN_CLIP):
        if overrides:
            raise UsageError(f"open_clip models take no overrides (got: {', '.join(overrides)})")
        return _open_clip(model_id.removeprefix(OPEN_CLIP), model_id, pretrained).image_encoder()
    if path.is_dir():
        return _local(path, model_id, pretrained, trust_remote_code)
    raise UsageError(
        f"unknown model '{model_id}': use cvfm/<preset>, timm/<arch>, hf/<repo-id>, open_clip/<arch>:<tag> "
        "or a folder"
    )


TINY_CLIP = "cvfm/tiny-clip"
OPEN_CLIP = "open_clip/"


def create_dual_encoder(
    model_id: str, *, pretrained: bool = True, trust_remote_code: bool = False
) -> DualEncoder:
    """Build the image-text model named by `model_id`: `cvfm/tiny-clip`, `hf/<repo>`, `open_clip/...` or a
    folder (a transformers folder wins over an open_clip one when a folder holds both)."""
    if model_id == TINY_CLIP:
        from cvfm.models.tiny_clip import build_tiny_clip

        model, tokenizer = build_tiny_clip()
        return HFDualEncoder(model, tokenizer, model_id, _SMALL_PREPROCESS)
    if model_id.startswith("hf/"):
        return _hf_dual(model_id.removeprefix("hf/"), model_id, pretrained, trust_remote_code)
    if model_id.startswith(OPEN_CLIP):
        return _open_clip(model_id.removeprefix(OPEN_CLIP), model_id, pretrained)
    path = Path(model_id)
    if path.is_dir():
        if (path / "backbone").is_dir():  # a cvfm run folder
            return create_dual_encoder(
                str(path / "backbone"), pretrained=pretrained, trust_remote_code=trust_remote_code
            )
        if is_paired_folder(path):
            return PairedEncoder.load(
                path, model_id, pretrained=pretrained, trust_remote_code=trust_remote_code
            )
        if (path / "config.json").exists() and "model_type" in json.loads((path / "config.json").read_text()):
            return _hf_dual(str(path), model_id, pretrained, trust_remote_code)
        if (path / OPEN_CLIP_CONFIG).exists():
            return _open_clip_folder(path, model_id, pretrained)
        raise UsageError(f"folder '{path}' holds no image-text model")
    raise UsageError(
        f"'{model_id}' is not an image-text model id: use {TINY_CLIP}, hf/<clip-like repo>, "
        "open_clip/<arch>:<tag> or a folder"
    )


def create_classifier(model_id: str) -> Classifier:
    """The classifier in folder `model_id` (classifier.json), or in its classifier/ sub-folder (a
    `cvfm finetune` run or a `cvfm unlearn` output)."""
    path = Path(model_id)
    if is_classifier_folder(path):
        return load_classifier(path)
    if is_classifier_folder(path / "classifier"):
        return load_classifier(path / "classifier")
    what = "folder" if path.is_dir() else "not a folder" if path.exists() else "does not exist"
    raise UsageError(
        f"'{model_id}' is not a classifier ({what}): expected a folder with classifier.json or a run "
        "folder with classifier/ (written by cvfm finetune or cvfm unlearn)"
    )


TINY_BLIP = "cvfm/tiny-blip"


def create_captioner(model_id: str, *, pretrained: bool = True, trust_remote_code: bool = False) -> Captioner:
    """A BLIP captioner: `cvfm/tiny-blip`, `hf/<repo>` (BlipForConditionalGeneration) or a folder."""
    from transformers import BlipForConditionalGeneration

    return _blip(model_id, BlipForConditionalGeneration, Captioner, pretrained, trust_remote_code)


def create_matcher(model_id: str, *, pretrained: bool = True, trust_remote_code: bool = False) -> Matcher:
    """A BLIP image-text matcher (ITM + ITC heads): `cvfm/tiny-blip`, `hf/<repo>`
    (BlipForImageTextRetrieval) or a folder."""
    from transformers import BlipForImageTextRetrieval

    return _blip(model_id, BlipForImageTextRetrieval, Matcher, pretrained, trust_remote_code)


def _blip(model_id: str, model_cls, face, pretrained: bool, trust_remote_code: bool):
    if model_id == TINY_BLIP:
        from cvfm.models.tiny_blip import build_tiny_blip, build_tokenizer

        return face(build_tiny_blip(model_cls), build_tokenizer(), model_id, _SMALL_PREPROCESS)
    path = Path(model_id)
    if path.is_dir() and (path / "backbone").is_dir():  # a cvfm run folder
        path = path / "backbone"
    if model_id.startswith("hf/"):
        repo = model_id.removeprefix("hf/")
    elif path.is_dir():
        repo = str(path)
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
        if model_cls.__name__ not in config.get("architectures", []):
            found = ", ".join(config.get("architectures", [])) or "no transformers model"
            raise UsageError(f"folder '{model_id}' holds {found}, not a {model_cls.__name__}")
    else:
        raise UsageError(
            f"unknown {face.__name__.lower()} '{model_id}': use {TINY_BLIP}, hf/<repo-id> or a folder"
        )
    try:
        model, preprocess = _hf_model(repo, model_id, pretrained, trust_remote_code, model_cls)
    except CvfmError:
        raise
    except ValueError as e:  # e.g. a config of another model type
        raise UsageError(f"'{model_id}' is not a {model_cls.__name__}: {e}") from None
    return face(model, _hf_tokenizer(repo, model_id, trust_remote_code), model_id, preprocess)


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


def _hf_model(repo: str, name: str, pretrained: bool, trust_remote_code: bool, model_cls=None):
    """A transformers model (`model_cls`, default AutoModel) from the hub or a folder; weights must match
    the architecture."""
    from transformers import AutoConfig, AutoModel

    model_cls = model_cls or AutoModel
    try:
        if pretrained:
            model, info = model_cls.from_pretrained(
                repo,
                output_loading_info=True,
                use_safetensors=True,
                ignore_mismatched_sizes=True,  # reported, then refused
                trust_remote_code=trust_remote_code,
            )
            check_loading_info(info, name)
        else:
            config = AutoConfig.from_pretrained(repo, trust_remote_code=trust_remote_code)
            if model_cls is AutoModel:
                model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
            else:
                model = model_cls(config)
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
    """The repo's image processor, reproduced exactly (`from_transformers`); without one, the model
    config's image size and ImageNet normalisation."""
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(repo, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        proc = None
    if proc is not None:
        return from_transformers(proc)
    size = getattr(model.config, "image_size", 224)
    return Preprocess(size=size[0] if isinstance(size, (list, tuple)) else int(size))


def _local(path: Path, name: str, pretrained: bool, trust_remote_code: bool) -> Encoder:
    """A folder's architecture, with its weights unless `pretrained=False` (a random-init baseline)."""
    if (path / "backbone").is_dir():  # a cvfm run folder, or a classifier (classifier.json + backbone/)
        return _local(path / "backbone", name, pretrained, trust_remote_code)
    if is_classifier_folder(path / "classifier"):  # a finetune run or an unlearn output: its backbone
        return _local(path / "classifier" / "backbone", name, pretrained, trust_remote_code)
    if is_paired_folder(path):  # the image encoder and its projection: pooled = the image embedding
        return PairedEncoder.load(
            path, name, pretrained=pretrained, trust_remote_code=trust_remote_code
        ).image_encoder()
    config_file = path / "config.json"
    open_clip_folder = (path / OPEN_CLIP_CONFIG).exists()
    if not config_file.exists():
        if open_clip_folder:
            return _open_clip_folder(path, name, pretrained).image_encoder()
        raise UsageError(
            f"folder '{path}' holds no model (no config.json, no {OPEN_CLIP_CONFIG}, no paired.json, "
            "no backbone/ or classifier/ sub-folder)"
        )
    config = json.loads(config_file.read_text())
    if "architecture" in config:  # timm's own export layout
        if not any(path.glob("*.safetensors")):
            raise UsageError(f"folder '{path}' has no .safetensors weights (cvfm reads no pickle files)")
        return TimmEncoder.load(path, name, weights=pretrained)
    if "model_type" in config:
        return _hf(str(path), name, pretrained, trust_remote_code)
    if open_clip_folder:
        return _open_clip_folder(path, name, pretrained).image_encoder()
    raise UsageError(f"folder '{path}' has a config.json that is neither a timm nor a transformers model")


# --------------------------------------------------------------------------------------------- open_clip


def _import_open_clip():
    try:
        import open_clip
    except ModuleNotFoundError:
        raise UsageError("open_clip models need open_clip_torch: pip install 'cvfm[open_clip]'") from None
    return open_clip


def _open_clip(spec: str, name: str, pretrained: bool) -> OpenCLIPDualEncoder:
    """`spec` is `<arch>[:<tag>]`, `hf-hub:<org>/<repo>` or `local-dir:<folder>` (open_clip's own names)."""
    _import_open_clip()
    if spec.startswith("hf-hub:"):
        return _open_clip_hub(spec.removeprefix("hf-hub:"), name, pretrained)
    if spec.startswith("local-dir:"):
        folder = Path(spec.removeprefix("local-dir:"))
        if not folder.is_dir():
            raise UsageError(f"'{name}': folder '{folder}' does not exist")
        return _open_clip_folder(folder, name, pretrained)
    arch, _, tag = spec.partition(":")
    return _open_clip_arch(arch, tag or None, name, pretrained)


def _open_clip_arch(arch: str, tag: str | None, name: str, pretrained: bool) -> OpenCLIPDualEncoder:
    """A built-in open_clip architecture; with `pretrained`, the weights of `tag` (a safetensors file
    on the hub, as open_clip would fetch it) and the tag's preprocessing; else a random init."""
    from cvfm.models.openclip import build

    open_clip = _import_open_clip()
    if arch not in open_clip.list_models():
        raise UsageError(f"open_clip has no model '{arch}'{_suggest(arch, open_clip.list_models())}")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    listed = f"tags: {', '.join(tags)}" if tags else "it has no pretrained tags"
    if tag is None and pretrained:
        raise UsageError(
            f"'{name}' names no weights: use {OPEN_CLIP}{arch}:<tag> ({listed}), or ask for a random init"
        )
    tag_cfg = {}
    if tag is not None:
        tag_cfg = open_clip.get_pretrained_cfg(arch, tag)
        if not tag_cfg:
            raise UsageError(f"open_clip model '{arch}' has no pretrained tag '{tag}' ({listed})")
    weights = _open_clip_tag_weights(tag_cfg, name) if pretrained else None
    model_cfg = open_clip.get_model_config(arch)
    # Tags trained with QuickGELU (OpenAI's) need it: open_clip only warns, cvfm builds the right model.
    quick_gelu = bool(tag_cfg.get("quick_gelu")) and not model_cfg.get("quick_gelu")
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    preprocess = {
        k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode", "fill_color") if k in tag_cfg
    }
    try:
        return build(
            arch, arch, model_cfg, weights, name, force_quick_gelu=quick_gelu, force_preprocess_cfg=preprocess
        )
    except CvfmError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # a tower's transformers config or tokenizer not cached
        raise _offline_hint(name, e) from None


def _open_clip_tag_weights(tag_cfg: dict, name: str) -> Path:
    """The safetensors file of a pretrained tag: open_clip's hub location with the `.safetensors` name that
    open_clip itself tries first; the pickle files it would fall back to are never fetched."""
    repo, filename = os.path.split(tag_cfg.get("hf_hub", ""))
    if not repo:
        raise UsageError(
            f"'{name}' weights are published only as a pickle file ({tag_cfg.get('url')}): "
            "cvfm reads .safetensors files only"
        )
    if not filename or filename == "open_clip_pytorch_model.bin":
        candidates = [OPEN_CLIP_WEIGHTS]
    elif filename.endswith(".safetensors"):
        candidates = [filename]
    elif filename.endswith((".bin", ".pth")):
        candidates = [filename[:-4] + ".safetensors"]
    else:
        raise UsageError(f"'{name}' weights are a {filename} file: cvfm reads .safetensors files only")
    return _hub_download(repo, candidates, name, f"publishes no safetensors weights in {repo}")


def _hub_download(repo: str, filenames: list[str], name: str, missing: str) -> Path:
    """The first of `filenames` in the hub repo (or the local cache); `missing` explains its absence."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    uncached = None
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename))
        except LocalEntryNotFoundError as e:  # offline and not cached (before its base class below)
            uncached = e
        except EntryNotFoundError:  # the repo has no such file
            continue
        except (OSError, ValueError) as e:
            raise _offline_hint(name, e) from None
    if uncached is not None:
        raise _offline_hint(name, uncached) from None
    raise UsageError(f"'{name}' {missing} ({', '.join(filenames)}; cvfm reads no pickle files)")


def _open_clip_hub(repo: str, name: str, pretrained: bool) -> OpenCLIPDualEncoder:
    """An open_clip hub repo: its config, and its `open_clip_model.safetensors` (the file open_clip tries
    first); the model is built from the cached copy of the repo, its tokenizer as open_clip names it."""
    from cvfm.models.openclip import build, read_config

    config_file = _hub_download(repo, [OPEN_CLIP_CONFIG], name, "is not an open_clip repo")
    folder = config_file.parent  # the cached snapshot of the repo
    model_cfg = read_config(folder, name)["model_cfg"]
    weights = None
    if pretrained:
        weights = _hub_download(repo, [OPEN_CLIP_WEIGHTS], name, "publishes no safetensors weights")
    try:
        return build(f"local-dir:{folder}", f"hf-hub:{repo}", model_cfg, weights, name)
    except CvfmError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise _offline_hint(name, e) from None


def _open_clip_folder(folder: Path, name: str, pretrained: bool) -> OpenCLIPDualEncoder:
    """A folder in open_clip's hub layout (`OpenCLIPDualEncoder.save`, or a downloaded repo)."""
    from cvfm.models.openclip import build, find_weights, read_config

    _import_open_clip()
    model_cfg = read_config(folder, name)["model_cfg"]
    weights = find_weights(folder, name) if pretrained else None
    try:
        return build(f"local-dir:{folder}", f"local-dir:{folder}", model_cfg, weights, name)
    except CvfmError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CvfmError(f"cannot load open_clip model from '{folder}': {first}") from None
