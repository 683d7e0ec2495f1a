"""One face for image-text dual encoders (CLIP, SigLIP, open_clip): projected image and text embeddings
in one space, a tokenizer, a learnable logit scale.

`HFDualEncoder` wraps a transformers model with `get_image_features` / `get_text_features` (CLIPModel,
SiglipModel, ...); `ImageTower` exposes a dual encoder's image half through the image `Encoder` face, so
`evaluate knn|linear` and `embed` take CLIP models like any backbone.
"""

from __future__ import annotations

import abc
from pathlib import Path

import torch
from torch import nn

from cvfm.data.views import Preprocess
from cvfm.models.encoder import Encoder, EncoderOutput


class DualEncoder(nn.Module, abc.ABC):
    """`encode_image(pixels)` and `encode_text(tokens)` return (B, embed_dim), not normalised;
    `tokenizer(texts)` returns the model's input tensors; `logit_scale` is log(1 / temperature)."""

    name: str
    embed_dim: int
    preprocess: Preprocess

    @property
    @abc.abstractmethod
    def tokenizer(self):
        """A picklable callable `list[str] -> dict[str, Tensor]` (runs in DataLoader workers)."""

    @property
    @abc.abstractmethod
    def logit_scale(self) -> nn.Parameter: ...

    @abc.abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor: ...

    @abc.abstractmethod
    def save(self, folder: str | Path) -> Path:
        """Write weights (safetensors), tokenizer and config, loadable by `create_dual_encoder(folder)`."""

    def image_encoder(self) -> ImageTower:
        return ImageTower(self)


class ImageTower(Encoder):
    """A dual encoder seen as an image encoder: the pooled output is the projected image embedding."""

    def __init__(self, dual: DualEncoder):
        super().__init__()
        self.dual, self.name = dual, dual.name
        self.num_features, self.preprocess = dual.embed_dim, dual.preprocess

    def _encode(self, x: torch.Tensor) -> EncoderOutput:
        return EncoderOutput(pooled=self.dual.encode_image(x), patch_tokens=None)

    def save(self, folder: str | Path) -> Path:
        return self.dual.save(folder)


class HFTokenizer:
    """A transformers tokenizer called the way its model was trained: CLIP pads to the longest text,
    SigLIP to a fixed length (its pooled token is the last one)."""

    def __init__(self, tokenizer, max_length: int, pad_to_max: bool):
        self.tokenizer, self.max_length, self.pad_to_max = tokenizer, max_length, pad_to_max

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts),
            padding="max_length" if self.pad_to_max else "longest",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return dict(enc)


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object whose `pooler_output` is the projected embedding."""
    return out if torch.is_tensor(out) else out.pooler_output


class HFDualEncoder(DualEncoder):
    """A transformers image-text model (CLIPModel, SiglipModel, ...) and its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer, name: str, preprocess: Preprocess):
        super().__init__()
        self.model, self.hf_tokenizer, self.name, self.preprocess = model, tokenizer, name, preprocess
        cfg = model.config
        text_cfg = getattr(cfg, "text_config", cfg)
        self.embed_dim = int(
            getattr(cfg, "projection_dim", None)
            or getattr(text_cfg, "projection_size", None)
            or text_cfg.hidden_size
        )
        pad_to_max = cfg.model_type.startswith("siglip")
        self._tokenizer = HFTokenizer(tokenizer, int(text_cfg.max_position_embeddings), pad_to_max)

    @property
    def tokenizer(self) -> HFTokenizer:
        return self._tokenizer

    @property
    def logit_scale(self) -> nn.Parameter:
        return self.model.logit_scale

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        return _features(self.model.get_text_features(**tokens))

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.hf_tokenizer.save_pretrained(folder)
        ImageTower(self)._save_preprocess(folder)
        return folder


def is_dual_model(model: nn.Module) -> bool:
    """A transformers model with both image and text embeddings (CLIP-like)."""
    return hasattr(model, "get_image_features") and hasattr(model, "get_text_features")
