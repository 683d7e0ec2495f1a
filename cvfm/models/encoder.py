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
from cvfm.models.masking import check_mask, new_mask_token, timm_vit_features

PREPROCESS_FILE = "preprocess.json"
PREPROCESS_KEY = "cvfm_preprocess"  # in a timm export's config.json


@dataclass
class EncoderOutput:
    pooled: torch.Tensor  # (B, D)
    patch_tokens: torch.Tensor | None  # (B, N, D): ViT patch tokens or a CNN's flattened last feature map


class Encoder(nn.Module, abc.ABC):
    """Base class: `forward(x)` returns the pooled embedding; `encode(x)` adds patch tokens, and can mask
    patches (`cvfm.models.masking`). `patch_size` is a token's stride in pixels (None: no token grid)."""

    name: str
    num_features: int
    preprocess: Preprocess
    patch_size: tuple[int, int] | None = None

    def __init__(self):
        super().__init__()
        self.register_parameter("mask_token", None)  # a learned token once `add_mask_token()` makes one

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x).pooled

    def encode(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, drop: bool = False
    ) -> EncoderOutput:
        """The pooled embedding and patch tokens of `x`. With `mask` ((B, N) or (B, h, w) bool over the token
        grid, True = masked) the masked patches are replaced by the learned mask token (`add_mask_token()`),
        or with `drop=True` left out: `patch_tokens` then holds the visible patches only, in grid order."""
        if mask is None:
            return self._encode(x)
        return self._encode_masked(x, mask, drop)

    @abc.abstractmethod
    def _encode(self, x: torch.Tensor) -> EncoderOutput: ...

    def _encode_masked(self, x: torch.Tensor, mask: torch.Tensor, drop: bool) -> EncoderOutput:
        raise CvfmError(
            f"'{self.name}' cannot mask patches: masking needs a ViT (a timm VisionTransformer, or a "
            "transformers ViT with a mask token)"
        )

    def add_mask_token(self) -> nn.Parameter:
        """The learned mask token (made on first call: a method that masks calls this before training)."""
        if self.mask_token is None:
            self.mask_token = new_mask_token(self.num_features)
        return self.mask_token

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The (rows, columns) of patch tokens for a `height` x `width` input."""
        if self.patch_size is None:
            raise CvfmError(f"'{self.name}' has no grid of patch tokens")
        return height // self.patch_size[0], width // self.patch_size[1]

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
        # Conv nets (more than a ViT's patch embedding) can run faster on NHWC input: oneDNN on CPU, tensor
        # cores on GPU (1.3x a training step of cvfm/tiny-resnet on one thread of the CPU of 2026-11-27, at
        # parity on an AMD EPYC of 2026-12-01). Their weights are NHWC too, so the gradients come out in the
        # weights' own layout and DDP's buckets take them without a copy (nor a "grad strides do not match
        # bucket view strides" warning); saved files are contiguous.
        self.channels_last = sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1
        if self.channels_last:
            model.to(memory_format=torch.channels_last)

    @property
    def is_vit(self) -> bool:
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(self.model, VisionTransformer)

    @property
    def patch_size(self) -> tuple[int, int] | None:
        if self.is_vit:
            return tuple(self.model.patch_embed.patch_size)
        info = getattr(self.model, "feature_info", None)  # a conv net: its last feature map's stride
        return (info[-1]["reduction"],) * 2 if info else None

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        if self.is_vit:
            return tuple(self.model.patch_embed.dynamic_feat_size((height, width)))
        if self.patch_size is None:
            return super().token_grid(height, width)
        stride = self.patch_size[0]  # a conv net's padded convolutions round up
        return -(-height // stride), -(-width // stride)

    def _encode(self, x: torch.Tensor) -> EncoderOutput:
        if self.channels_last and x.ndim == 4 and x.device.type in ("cpu", "cuda"):
            x = x.contiguous(memory_format=torch.channels_last)
        return self._output(self.model.forward_features(x))

    def _encode_masked(self, x: torch.Tensor, mask: torch.Tensor, drop: bool) -> EncoderOutput:
        if not self.is_vit:
            return super()._encode_masked(x, mask, drop)
        if not drop and self.mask_token is None:
            raise CvfmError("replacing masked patches needs a mask token: call add_mask_token() first")
        return self._output(timm_vit_features(self.model, x, mask, self.mask_token, drop))

    def _output(self, feats: torch.Tensor) -> EncoderOutput:
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
        patch = getattr(cfg, "patch_size", None) if getattr(cfg, "hidden_size", None) else None
        self.patch_size = (patch, patch) if isinstance(patch, int) else (tuple(patch) if patch else None)

    def add_mask_token(self) -> nn.Parameter:
        """The model's own mask token (transformers ViTs built with `use_mask_token=True`, DINOv2, BEiT)."""
        token = getattr(getattr(self.model, "embeddings", None), "mask_token", None)
        if token is None:
            raise CvfmError(f"'{self.name}' has no mask token (a transformers ViT needs use_mask_token=True)")
        return token

    def _encode(self, x: torch.Tensor, **kwargs) -> EncoderOutput:
        out = self.model(pixel_values=x, **kwargs)
        hidden = out.last_hidden_state
        if hidden.ndim == 3:
            return EncoderOutput(pooled=hidden[:, 0], patch_tokens=hidden[:, self.num_prefix_tokens :])
        pooled = getattr(out, "pooler_output", None)
        pooled = pooled.flatten(1) if pooled is not None else hidden.mean(dim=(2, 3))
        return EncoderOutput(pooled=pooled, patch_tokens=hidden.flatten(2).transpose(1, 2))

    def _encode_masked(self, x: torch.Tensor, mask: torch.Tensor, drop: bool) -> EncoderOutput:
        if drop or self.patch_size is None:  # transformers' ViTs replace masked patches, none drops them
            return super()._encode_masked(x, mask, drop)
        self.add_mask_token()  # refuses a model without one
        rows, cols = self.token_grid(*x.shape[-2:])
        return self._encode(x, bool_masked_pos=check_mask(mask, x.shape[0], rows * cols, drop=False))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.model.save_pretrained(folder, safe_serialization=True)
        self._save_preprocess(folder)
        return folder


def token_grid(encoder: Encoder, size: tuple[int, int], n: int) -> tuple[int, int]:
    """The (rows, columns) of `n` tokens of an input of `size`: the encoder's grid when it matches, else
    the square-ish grid of the input's aspect ratio (an intermediate layer of another stride)."""
    try:
        grid = encoder.token_grid(*size)
        if grid[0] * grid[1] == n:
            return grid
    except CvfmError:
        pass
    h = max(1, round((n * size[0] / size[1]) ** 0.5))
    if n % h:
        raise CvfmError(f"cannot arrange {n} tokens of a {size[0]}x{size[1]} input on a grid")
    return h, n // h


def resize_tokens(tokens: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D) tokens on a `grid` (h, w), bilinearly resized to `size` (H, W): (B, H*W, D)."""
    if tuple(grid) == tuple(size):
        return tokens
    b, _, d = tokens.shape
    maps = tokens.transpose(1, 2).reshape(b, d, *grid)
    maps = torch.nn.functional.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)
    return maps.flatten(2).transpose(1, 2)


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
