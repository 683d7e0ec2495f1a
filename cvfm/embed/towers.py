"""The model halves `embed` runs: an image encoder, a text encoder, or both of an image-text model."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cvfm.data.views import Preprocess
from cvfm.errors import UsageError
from cvfm.registry import create_dual_encoder, create_encoder


@dataclass
class Towers:
    module: nn.Module
    image: Callable[[torch.Tensor], torch.Tensor] | None  # pixels (B, 3, H, W) -> (B, D)
    text: Callable[[dict[str, torch.Tensor]], torch.Tensor] | None  # tokens -> (B, D)
    dims: dict[str, int]  # "image" and/or "text" -> embedding size
    preprocess: Preprocess | None
    tokenizer: Callable[[list[str]], dict[str, torch.Tensor]] | None


def load_towers(
    model: str, *, images: bool, texts: bool, pretrained: bool = True, trust_remote_code: bool = False
) -> Towers:
    """Build `model` for the modalities asked for. Texts need an image-text model (CLIP-like); random
    initial weights are seeded, so every process and every resumed run gets the same ones."""
    torch.manual_seed(0)
    if not texts:
        encoder = create_encoder(model, pretrained=pretrained, trust_remote_code=trust_remote_code)
        return Towers(encoder, encoder, None, {"image": encoder.num_features}, encoder.preprocess, None)
    try:
        dual = create_dual_encoder(model, pretrained=pretrained, trust_remote_code=trust_remote_code)
    except UsageError as e:
        raise UsageError(f"--text-column needs an image-text model (CLIP-like): {e}") from None
    dims = {"image": dual.embed_dim, "text": dual.embed_dim} if images else {"text": dual.embed_dim}
    return Towers(
        dual,
        dual.encode_image if images else None,
        dual.encode_text,
        dims,
        dual.preprocess if images else None,
        dual.tokenizer,
    )
