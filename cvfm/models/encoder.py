"""One face for every image encoder: pooled embedding, patch tokens, embedding size, preprocessing.

`TimmEncoder` wraps any timm model (`forward_features` then `forward_head(pre_logits=True)`);
`HFEncoder` wraps a transformers vision backbone (`AutoModel`). Both save to a folder that loads back
through the registry, and timm encoders save in timm's own layout (`timm.create_model("local-dir:...")`).
"""

from __future__ import annotations

import abc
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from cvfm.data.preprocess import TIMM_CROP_MODE_OF, Preprocess, from_timm
from cvfm.errors import CvfmError

PREPROCESS_FILE = "preprocess.json"
PREPROCESS_KEY = "cvfm_preprocess"  # in a timm export's config.json


@dataclass
class EncoderOutput:
    pooled: torch.Tensor  # (B, D)
    patch_tokens: torch.Tensor | None  # (B, N, D): ViT patch tokens or a CNN's flattened last feature map


class Encoder(nn.Module, abc.ABC):
    """Base class: `forward(x)` returns the pooled embedding; `encode(x)` adds patch tokens."""

    name: str
    num_features: int
    preprocess: Preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x).pooled

    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> EncoderOutput: ...

    @abc.abstractmethod
    def save(self, folder: str | Path) -> Path:
        """Write weights (safetensors) and config to `folder`, loadable by `create_encoder(folder)`."""

    def _save_preprocess(self, folder: Path) -> None:
        (folder / PREPROCESS_FILE).write_text(json.dumps(asdict(self.preprocess), indent=2) + "\n")


def read_preprocess(folder: Path) -> Preprocess | None:
    """A folder's preprocess.json (one without `library`, written by an earlier cvfm, keeps its behaviour)."""
    path = folder / PREPROCESS_FILE
    if not path.exists():
        return None
    return _preprocess_from_dict(json.loads(path.read_text()), path)


def _preprocess_from_dict(d: dict, path: Path) -> Preprocess:
    try:
        return Preprocess.from_dict(d)
    except (ValueError, TypeError, KeyError) as e:
        raise CvfmError(f"cannot read {path}: {e}") from None


class TimmEncoder(Encoder):
    """A timm model built as `timm.create_model(arch, num_classes=0, **model_args)`."""

    def __init__(
        self, model: nn.Module, name: str, arch: str, model_args: dict, preprocess: Preprocess | None = None
    ):
        super().__init__()
        self.model, self.name, self.arch, self.model_args = model, name, arch, dict(model_args)
        self.num_features = int(model.num_features)
        self.preprocess = preprocess or _timm_preprocess(model)
        # Conv nets (more than a ViT's patch embedding) run faster on NHWC input: oneDNN on CPU, tensor cores
        # on GPU (1.3x a training step of cvfm/tiny-resnet on one CPU thread). Their weights are NHWC too, so
        # the gradients come out in the weights' own layout and DDP's buckets take them without a copy (nor
        # a "grad strides do not match bucket view strides" warning); saved files are contiguous.
        self.channels_last = sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1
        if self.channels_last:
            model.to(memory_format=torch.channels_last)

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        if self.channels_last and x.ndim == 4 and x.device.type in ("cpu", "cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
        feats = self.model.forward_features(x)
        pooled = self.model.forward_head(feats, pre_logits=True)
        if feats.ndim == 3:  # (B, tokens, D): drop class / register tokens
            tokens = feats[:, getattr(self.model, "num_prefix_tokens", 0) :]
        elif feats.ndim == 4:  # (B, C, H, W) -> (B, H*W, C)
            tokens = feats.flatten(2).transpose(1, 2)
        else:
            tokens = None
        return EncoderOutput(pooled=pooled, patch_tokens=tokens)

    def save(self, folder: str | Path) -> Path:
        """timm's hub layout (config.json + model.safetensors), written by us so that any timm version
        reads it: `timm.create_model("local-dir:<folder>")` or `create_model(arch, **model_args)`."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        pre = self.preprocess
        config = {
            "architecture": self.arch,
            "num_classes": 0,
            "num_features": self.num_features,
            "model_args": {**_jsonable(self.model_args), "num_classes": 0},
            "pretrained_cfg": {
                "input_size": [3, pre.size, pre.size],
                "mean": list(pre.mean),
                "std": list(pre.std),
                "crop_pct": pre.crop_pct,
                "crop_mode": TIMM_CROP_MODE_OF[pre.resize_mode],
                "interpolation": pre.interpolation,
                "num_classes": 0,
            },
            # cvfm's exact description (timm ignores top-level keys it does not know; its pretrained_cfg
            # cannot hold them): a preset keeps cvfm's convention when loaded back.
            PREPROCESS_KEY: asdict(pre),
        }
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        return folder

    @classmethod
    def load(cls, folder: Path, name: str, weights: bool = True) -> TimmEncoder:
        """Rebuild from `save()`'s layout; every weight key must match the architecture.

        `weights=False` builds the architecture with a fresh random initialisation."""
        import timm
        from safetensors.torch import load_file

        config = json.loads((folder / "config.json").read_text())
        args = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes"}
        model = timm.create_model(config["architecture"], pretrained=False, num_classes=0, **args)
        try:
            if weights:
                model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
        except RuntimeError as e:
            detail = " ".join(str(e).split())[:600]
            raise CvfmError(f"weights of '{name}' do not match its architecture: {detail}") from None
        if PREPROCESS_KEY in config:
            pre = _preprocess_from_dict(config[PREPROCESS_KEY], folder / "config.json")
        else:  # written by timm (or by cvfm before it recorded its convention): timm's preprocessing
            pre = _timm_preprocess(model, config.get("pretrained_cfg") or None)
        return cls(model, name, config["architecture"], args, pre)


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _timm_preprocess(model: nn.Module, pretrained_cfg: dict | None = None) -> Preprocess:
    """timm's evaluation preprocessing of `model` (of a folder's `pretrained_cfg` when given)."""
    from timm.data import resolve_data_config

    return from_timm(resolve_data_config({}, pretrained_cfg=pretrained_cfg, model=model))


class HFEncoder(Encoder):
    """A transformers vision backbone; the pooled embedding is the CLS token (or the pooled feature map)."""

    def __init__(self, model: nn.Module, name: str, preprocess: Preprocess):
        super().__init__()
        self.model, self.name, self.preprocess = model, name, preprocess
        cfg = model.config
        self.num_features = int(getattr(cfg, "hidden_size", None) or cfg.hidden_sizes[-1])
        self.num_prefix_tokens = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)

    def encode(self, x: torch.Tensor) -> EncoderOutput:
        out = self.model(pixel_values=x)
        hidden = out.last_hidden_state
        if hidden.ndim == 3:
            return EncoderOutput(pooled=hidden[:, 0], patch_tokens=hidden[:, self.num_prefix_tokens :])
        pooled = getattr(out, "pooler_output", None)
        pooled = pooled.flatten(1) if pooled is not None else hidden.mean(dim=(2, 3))
        return EncoderOutput(pooled=pooled, patch_tokens=hidden.flatten(2).transpose(1, 2))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.model.save_pretrained(folder, safe_serialization=True)
        self._save_preprocess(folder)
        return folder


def check_loading_info(info: dict, name: str) -> None:
    """Turn transformers' loading warnings into an error: weights must match the architecture."""
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.")]
    problems = {
        "missing": missing,
        "unexpected": list(info.get("unexpected_keys", [])),
        "mismatched": [str(m) for m in info.get("mismatched_keys", [])],
    }
    bad = {k: v for k, v in problems.items() if v}
    if bad:
        detail = "; ".join(
            f"{k} keys: {', '.join(map(str, v[:5]))}{' ...' if len(v) > 5 else ''}" for k, v in bad.items()
        )
        raise CvfmError(f"weights of '{name}' do not match its architecture ({detail})")
