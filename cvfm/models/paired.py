"""Any registry image encoder paired with the text half of an image-text model, trained together by CLIP.

`PairedEncoder` = an image `Encoder`, a linear projection (no bias, as CLIP's) from its pooled features to
the text tower's embedding size, the text tower of a dual encoder, and its own logit scale (initialised at
ln(1 / 0.07), as CLIP's). So `cvfm pretrain --method clip --model timm/resnet18 --text-model cvfm/tiny-clip`
trains any backbone against a text tower.

The dual encoder's image tower is not used. For transformers CLIP-like models (CLIP, MetaCLIP 2, SigLIP,
SigLIP 2) only the text half is kept: `CLIPTextModelWithProjection` (the dual's own `text_model` and
`text_projection` modules) or `SiglipTextModel`. Any other dual (open_clip, ...) is kept whole, with every
parameter that its text embedding does not reach frozen (no gradients, no optimizer state, no DDP hooks).

Folder layout (`save()`), loaded back by `create_dual_encoder(folder)` and, as an image encoder whose pooled
output is the projected image embedding, by `create_encoder(folder)`:

    paired.json         {"format": "cvfm-paired-encoder", "version": 1, "embed_dim", "image", "text",
                         "text_kind", "heads"}
    image/              the image encoder's own save (loads alone: `create_encoder`, timm `local-dir:`)
    text/               transformers text model + tokenizer (text_kind "transformers"), or the whole
                        dual encoder's save (text_kind "dual", loads with `create_dual_encoder`)
    heads.safetensors   projection.weight (embed_dim, image features), logit_scale ()
"""

from __future__ import annotations

import abc
import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cvfm.errors import CvfmError, UsageError
from cvfm.models.dual import DualEncoder, HFDualEncoder, HFTokenizer
from cvfm.models.encoder import Encoder, check_loading_info

PAIRED_CONFIG = "paired.json"
FORMAT = "cvfm-paired-encoder"
VERSION = 1
HEADS_FILE = "heads.safetensors"
HEAD_KEYS = ("projection.weight", "logit_scale")
INIT_LOGIT_SCALE = math.log(1 / 0.07)

# model_type of a transformers dual -> the transformers class of its text half. The class's weight names
# are the dual's text names (text_model.*, text_projection.weight) and its output the dual's
# `get_text_features` (text_embeds, or pooler_output for SigLIP, whose head is inside the text model).
HF_TEXT_CLASSES = {
    "clip": "CLIPTextModelWithProjection",
    "metaclip_2": "MetaClip2TextModelWithProjection",
    "siglip": "SiglipTextModel",
    "siglip2": "Siglip2TextModel",
}


# ---------------------------------------------------------------------------------------------- text towers


class TextTower(nn.Module, abc.ABC):
    """The text half of a dual encoder: `encode_text(tokens)` -> (B, embed_dim), a picklable `tokenizer`,
    and `save(folder)`."""

    kind: str
    name: str
    embed_dim: int
    tokenizer: object

    @abc.abstractmethod
    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @abc.abstractmethod
    def save(self, folder: Path) -> None: ...


class HFTextTower(TextTower):
    """A transformers text model (CLIPTextModelWithProjection, SiglipTextModel, ...) and its tokenizer."""

    kind = "transformers"

    def __init__(self, model: nn.Module, hf_tokenizer, name: str):
        super().__init__()
        self.model, self.hf_tokenizer, self.name = model, hf_tokenizer, name
        cfg = model.config
        self.embed_dim = int(
            getattr(cfg, "projection_dim", None) or getattr(cfg, "projection_size", None) or cfg.hidden_size
        )
        pad_to_max = cfg.model_type.startswith("siglip")  # as HFDualEncoder's tokenizer
        self.tokenizer = HFTokenizer(hf_tokenizer, int(cfg.max_position_embeddings), pad_to_max)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.model(**tokens)
        embeds = getattr(out, "text_embeds", None)
        return embeds if embeds is not None else out.pooler_output

    def save(self, folder: Path) -> None:
        self.model.save_pretrained(folder, safe_serialization=True)
        self.hf_tokenizer.save_pretrained(folder)

    @classmethod
    def from_dual(cls, dual: HFDualEncoder) -> HFTextTower | None:
        """The dual's own text modules in their transformers text class; None for another model type."""
        import transformers

        model = dual.model
        class_name = HF_TEXT_CLASSES.get(model.config.model_type)
        text_cls = getattr(transformers, class_name, None) if class_name else None
        if text_cls is None:
            return None
        if not class_name.endswith("WithProjection"):  # SigLIP: the text model is the whole text half
            text = model.text_model
            return cls(text, dual.hf_tokenizer, dual.name) if isinstance(text, text_cls) else None
        config = copy.deepcopy(model.config.text_config)
        config.projection_dim = int(model.config.projection_dim)
        with torch.device("meta"):  # both of its modules are replaced by the dual's own just below
            text = text_cls(config)
        text.text_model, text.text_projection = model.text_model, model.text_projection
        if any(t.is_meta for t in (*text.parameters(), *text.buffers())):
            return None
        return cls(text.train(model.training), dual.hf_tokenizer, dual.name)

    @classmethod
    def load(cls, folder: Path, name: str, pretrained: bool) -> HFTextTower:
        import transformers
        from transformers import AutoTokenizer

        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise CvfmError(f"'{name}': cannot read {folder / 'config.json'}: {e}") from None
        arch = (config.get("architectures") or [None])[0]
        if arch not in HF_TEXT_CLASSES.values() or not hasattr(transformers, arch):
            raise CvfmError(f"'{name}': {folder} holds a '{arch}', not a supported text model")
        text_cls = getattr(transformers, arch)
        try:
            if pretrained:
                model, info = text_cls.from_pretrained(
                    folder, output_loading_info=True, use_safetensors=True, ignore_mismatched_sizes=True
                )
                check_loading_info(info, name)
            else:
                model = text_cls(text_cls.config_class.from_pretrained(folder))
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError) as e:
            raise CvfmError(f"cannot load the text model of '{name}' from '{folder}': {e}") from None
        return cls(model.eval(), tokenizer, name)


class DualTextTower(TextTower):
    """A whole dual encoder used for its text half (open_clip, other transformers models): the parameters
    its text embedding does not reach (image tower, logit scale) are frozen."""

    kind = "dual"

    def __init__(self, dual: DualEncoder):
        super().__init__()
        self.dual, self.name, self.embed_dim = dual, dual.name, int(dual.embed_dim)
        self.tokenizer = dual.tokenizer
        _freeze_unreached(dual)

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.dual.encode_text(tokens)

    def save(self, folder: Path) -> None:
        self.dual.save(folder)


def _freeze_unreached(dual: DualEncoder) -> None:
    """Freeze every trainable parameter that gets no gradient from one text embedding (found by a
    backward pass in eval mode, so no dropout draws from the RNG)."""
    params = [p for p in dual.parameters() if p.requires_grad]
    grads = [p.grad for p in params]
    was_training = dual.training
    dual.eval()
    try:
        for p in params:
            p.grad = None
        with torch.enable_grad():
            dual.encode_text(dual.tokenizer(["a photo"])).float().sum().backward()
        reached = [p.grad is not None for p in params]
    finally:
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        dual.train(was_training)
    for p, used in zip(params, reached, strict=True):
        if not used:
            p.requires_grad_(False)


def text_tower(dual: DualEncoder) -> TextTower:
    """The text half of `dual`: its transformers text model where that can be separated, else all of it."""
    if isinstance(dual, HFDualEncoder):
        tower = HFTextTower.from_dual(dual)
        if tower is not None:
            return tower
    return DualTextTower(dual)


# ---------------------------------------------------------------------------------------------- the pair


class PairedEncoder(DualEncoder):
    """`image` (any registry `Encoder`) + `projection` (num_features -> embed_dim, no bias) and the text
    half of `text` (a `DualEncoder`, or a `TextTower`), with their own learnable `logit_scale`."""

    def __init__(self, image: Encoder, text: DualEncoder | TextTower, name: str | None = None):
        super().__init__()
        self.image = image
        self.text = text if isinstance(text, TextTower) else text_tower(text)
        self.embed_dim = int(self.text.embed_dim)
        self.name = name or f"{image.name}+{self.text.name}"
        self.preprocess = image.preprocess
        # CLIP / open_clip initialise their projections with std width ** -0.5.
        self.projection = nn.Linear(image.num_features, self.embed_dim, bias=False)
        nn.init.normal_(self.projection.weight, std=image.num_features**-0.5)
        self.scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))

    @property
    def tokenizer(self):
        return self.text.tokenizer

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.scale

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projection(self.image(pixels))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.text.encode_text(tokens)

    def heads(self) -> dict[str, torch.Tensor]:
        return {"projection.weight": self.projection.weight, "logit_scale": self.scale}

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.image.save(folder / "image")
        (folder / "text").mkdir(exist_ok=True)
        self.text.save(folder / "text")
        heads = {k: v.detach().contiguous().cpu() for k, v in self.heads().items()}
        save_file(heads, folder / HEADS_FILE, metadata={"format": "pt"})
        config = {
            "format": FORMAT,
            "version": VERSION,
            "embed_dim": self.embed_dim,
            "image": "image",
            "text": "text",
            "text_kind": self.text.kind,
            "heads": HEADS_FILE,
            "image_features": int(self.image.num_features),
            "name": self.name,
        }
        (folder / PAIRED_CONFIG).write_text(json.dumps(config, indent=2) + "\n")  # last: marks it complete
        return folder

    @classmethod
    def load(
        cls,
        folder: str | Path,
        name: str,
        *,
        load_encoder: Callable[[str], Encoder],
        load_dual: Callable[[str], DualEncoder],
        pretrained: bool = True,
    ) -> PairedEncoder:
        """Rebuild from `save()`'s layout, its parts by `load_encoder(image folder)` and, for a whole dual as
        text half, `load_dual(text folder)` (the registry's doors); `pretrained=False` keeps the architecture
        with a fresh random initialisation (image, text and heads: the loaders are asked for the same)."""
        folder = Path(folder)
        config = read_paired_config(folder, name)
        image = load_encoder(str(_sub(folder, config, "image", name)))
        text_folder = _sub(folder, config, "text", name)
        if config["text_kind"] == HFTextTower.kind:
            text: TextTower = HFTextTower.load(text_folder, name, pretrained)
        else:
            text = DualTextTower(load_dual(str(text_folder)))
        if text.embed_dim != config["embed_dim"]:
            raise CvfmError(
                f"'{name}': its text model embeds in {text.embed_dim} dimensions, {PAIRED_CONFIG} says "
                f"{config['embed_dim']}"
            )
        model = cls(image, text, name=name)
        if pretrained:
            model.load_heads(_sub(folder, config, "heads", name, is_file=True), name)
        return model.eval()

    def load_heads(self, path: Path, name: str) -> None:
        """The projection and logit scale from a safetensors file: exactly `HEAD_KEYS`, of matching shapes."""
        from safetensors.torch import load_file

        if path.suffix != ".safetensors":
            raise UsageError(f"'{name}': {path.name} is not a .safetensors file (cvfm reads no pickle files)")
        try:
            state = load_file(path)
        except Exception as e:  # noqa: BLE001 (a truncated or foreign file)
            raise CvfmError(f"'{name}': cannot read {path.name}: {' '.join(str(e).split())[:300]}") from None
        own = self.heads()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        wrong = [
            f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
            for k, v in own.items()
            if k in state and state[k].shape != v.shape
        ]
        if missing or unexpected or wrong:
            parts = [("missing keys", missing), ("unexpected keys", unexpected), ("mismatched", wrong)]
            detail = "; ".join(f"{label}: {', '.join(v)}" for label, v in parts if v)
            raise CvfmError(f"weights of '{name}' ({path.name}) do not match its architecture ({detail})")
        with torch.no_grad():
            for k, v in own.items():
                v.copy_(state[k])


def is_paired_folder(folder: Path) -> bool:
    return (folder / PAIRED_CONFIG).is_file()


def read_paired_config(folder: Path, name: str) -> dict:
    """`paired.json`, checked: the format marker, a known version and text kind, an integer embed_dim."""
    try:
        config = json.loads((folder / PAIRED_CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise CvfmError(f"'{name}': cannot read {PAIRED_CONFIG}: {e}") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise CvfmError(f"'{name}': {PAIRED_CONFIG} is not a cvfm paired encoder (format != '{FORMAT}')")
    if config.get("version") != VERSION:
        raise CvfmError(f"'{name}': {PAIRED_CONFIG} version {config.get('version')!r} is not {VERSION}")
    if config.get("text_kind") not in (HFTextTower.kind, DualTextTower.kind):
        raise CvfmError(f"'{name}': unknown text_kind {config.get('text_kind')!r} in {PAIRED_CONFIG}")
    if not isinstance(config.get("embed_dim"), int):
        raise CvfmError(f"'{name}': {PAIRED_CONFIG} has no integer embed_dim")
    return config


def _sub(folder: Path, config: dict, key: str, name: str, is_file: bool = False) -> Path:
    """A part named in paired.json: a plain name inside the folder, which must exist."""
    part = config.get(key)
    if not isinstance(part, str) or part in ("", ".", "..") or Path(part).name != part:
        raise CvfmError(f"'{name}': {PAIRED_CONFIG} names no valid '{key}' ({part!r})")
    path = folder / part
    if not (path.is_file() if is_file else path.is_dir()):
        raise CvfmError(f"'{name}': {path} is missing")
    return path
