"""The raw-pixel baseline: an 'encoder' that returns the normalised image itself, flattened."""

from __future__ import annotations

from pathlib import Path

import torch

from cvfm.data.views import Preprocess
from cvfm.errors import CvfmError
from cvfm.models.encoder import Encoder, EncoderOutput


class PixelEncoder(Encoder):
    def __init__(self, size: int = 32, name: str = "cvfm/pixels"):
        super().__init__()
        self.name, self.num_features = name, 3 * size * size
        self.preprocess = Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)

    def _encode(self, x: torch.Tensor) -> EncoderOutput:
        return EncoderOutput(pooled=x.flatten(1), patch_tokens=None)

    def save(self, folder: str | Path) -> Path:
        raise CvfmError("the raw-pixel baseline has no weights to save")
