"""The picture of what a masked autoencoder does: one row per image, a column per stage, as a PNG a person
looks at (small images are enlarged, pixel for pixel)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from cvfm.data.preprocess import Preprocess
from cvfm.runtime.files import atomic_write

COLUMNS = ("original", "masked", "reconstruction", "+ visible")
MIN_TILE = 128  # pixels: smaller images are enlarged by a whole factor
PAD, HEADER = 2, 16


def tile_size(size: int) -> int:
    """The side of one enlarged image."""
    return size * max(1, -(-MIN_TILE // size))


def write_reconstructions(path: Path, columns: list[torch.Tensor], pre: Preprocess) -> Path:
    """`columns`: one (B, C, H, W) batch per `COLUMNS` entry, normalised by `pre`; writes `path`: a header
    naming the columns, then B rows of 4 images."""
    mean = torch.tensor(pre.mean).view(1, -1, 1, 1)
    std = torch.tensor(pre.std).view(1, -1, 1, 1)
    scale = tile_size(columns[0].shape[-2]) // columns[0].shape[-2]
    shown = [F.interpolate((c.float().cpu() * std + mean).clamp(0, 1), scale_factor=scale) for c in columns]
    rows = torch.stack(shown, dim=1).flatten(0, 1)  # image 0's columns, image 1's, ...
    grid = make_grid(rows, nrow=len(columns), padding=PAD, pad_value=1.0)
    pixels = (grid * 255).round().byte().permute(1, 2, 0).numpy()
    picture = Image.new("RGB", (pixels.shape[1], pixels.shape[0] + HEADER), "white")
    picture.paste(Image.fromarray(pixels), (0, HEADER))
    draw, width = ImageDraw.Draw(picture), (pixels.shape[1] - PAD) // len(columns)
    for i, name in enumerate(COLUMNS):
        draw.text((PAD + i * width + 2, 2), name, fill="black")
    return atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
