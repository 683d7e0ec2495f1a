"""open_clip models: `open_clip/<arch>[:<tag>]` (a built-in architecture; the tag's weights),
`open_clip/hf-hub:<org>/<repo>`, `open_clip/local-dir:<folder>`, and folders in open_clip's hub layout
(open_clip_config.json). Weights are read from safetensors files only; pickle files are never fetched.
"""

from __future__ import annotations

import os
from pathlib import Path

from cvfm.errors import CvfmError, UsageError
from cvfm.models.openclip import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    OpenCLIPDualEncoder,
    build,
    find_weights,
    read_config,
)
from cvfm.registry.hints import first_line, offline_hint, suggest
from cvfm.registry.source import Request

PREFIX = "open_clip/"


def is_folder(folder: Path) -> bool:
    return (folder / CONFIG_FILE).exists()


def load_folder(folder: str, request: Request) -> OpenCLIPDualEncoder:
    return _open_clip_folder(Path(folder), request.model_id, request.pretrained)


def _import_open_clip():
    try:
        import open_clip
    except ModuleNotFoundError:
        raise UsageError("open_clip models need open_clip_torch: pip install 'cvfm[open_clip]'") from None
    return open_clip


def load_id(spec: str, request: Request) -> OpenCLIPDualEncoder:
    """`spec` is `<arch>[:<tag>]`, `hf-hub:<org>/<repo>` or `local-dir:<folder>` (open_clip's own names)."""
    name, pretrained = request.model_id, request.pretrained
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
    open_clip = _import_open_clip()
    if arch not in open_clip.list_models():
        raise UsageError(f"open_clip has no model '{arch}'{suggest(arch, open_clip.list_models())}")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    listed = f"tags: {', '.join(tags)}" if tags else "it has no pretrained tags"
    if tag is None and pretrained:
        raise UsageError(
            f"'{name}' names no weights: use {PREFIX}{arch}:<tag> ({listed}), or ask for a random init"
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
        raise offline_hint(name, e) from None


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
        candidates = [WEIGHTS_FILE]
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
            raise offline_hint(name, e) from None
    if uncached is not None:
        raise offline_hint(name, uncached) from None
    raise UsageError(f"'{name}' {missing} ({', '.join(filenames)}; cvfm reads no pickle files)")


def _open_clip_hub(repo: str, name: str, pretrained: bool) -> OpenCLIPDualEncoder:
    """An open_clip hub repo: its config, and its `open_clip_model.safetensors` (the file open_clip tries
    first); the model is built from the cached copy of the repo, its tokenizer as open_clip names it."""
    config_file = _hub_download(repo, [CONFIG_FILE], name, "is not an open_clip repo")
    folder = config_file.parent  # the cached snapshot of the repo
    model_cfg = read_config(folder, name)["model_cfg"]
    weights = None
    if pretrained:
        weights = _hub_download(repo, [WEIGHTS_FILE], name, "publishes no safetensors weights")
    try:
        return build(f"local-dir:{folder}", f"hf-hub:{repo}", model_cfg, weights, name)
    except CvfmError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise offline_hint(name, e) from None


def _open_clip_folder(folder: Path, name: str, pretrained: bool) -> OpenCLIPDualEncoder:
    """A folder in open_clip's hub layout (`OpenCLIPDualEncoder.save`, or a downloaded repo)."""
    _import_open_clip()
    model_cfg = read_config(folder, name)["model_cfg"]
    weights = find_weights(folder, name) if pretrained else None
    try:
        return build(f"local-dir:{folder}", f"local-dir:{folder}", model_cfg, weights, name)
    except CvfmError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CvfmError(f"cannot load open_clip model from '{folder}': {first_line(e)}") from None


def rows(pattern: str) -> list[dict]:
    """open_clip's architectures; with a ':' in the pattern, its pretrained `<arch>:<tag>` ids."""
    tags = ":" in pattern
    open_clip = _import_open_clip()

    def row(arch: str, tag: str | None) -> dict:
        size = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {}).get("image_size")
        size = size[0] if isinstance(size, (list, tuple)) and len(set(size)) == 1 else size
        return {
            "id": f"{PREFIX}{arch}" + (f":{tag}" if tag else ""),
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
