"""Where the automatic mask generator looks: the point grid prompted in each crop and the crops themselves
(the whole image, then 2x2, 4x4, ... overlapping crops per layer), as segment-anything's utils/amg.py.

Boxes are x0, y0, x1, y1 in pixels of the image with x1, y1 exclusive.
"""

from __future__ import annotations

import math

import numpy as np
import torch

EDGE_PIXELS = 20.0  # segment-anything's is_box_near_crop_edge atol


def point_grid(n_per_side: int) -> np.ndarray:
    """(n * n, 2) x, y points in [0, 1], cell centres of an n x n grid, x varying fastest."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    x, y = np.meshgrid(side, side)
    return np.stack([x, y], axis=-1).reshape(-1, 2)


def layer_grids(n_per_side: int, n_layers: int, downscale: int) -> list[np.ndarray]:
    """The grid of each crop layer 0..n_layers: layer i has int(n_per_side / downscale**i) points a side."""
    return [point_grid(int(n_per_side / downscale**i)) for i in range(n_layers + 1)]


def crop_boxes(size: tuple[int, int], n_layers: int, overlap_ratio: float) -> list[tuple[list[int], int]]:
    """(box, layer) of every crop of an (H, W) image: the whole image (layer 0), then for layer i >= 1 a
    2**i x 2**i grid of crops overlapping by `overlap_ratio` of the short side (scaled down by 2**(i-1)),
    x-major order."""
    h, w = size
    crops = [([0, 0, w, h], 0)]
    for layer in range(1, n_layers + 1):
        n = 2**layer
        overlap = int(overlap_ratio * min(h, w) * (2 / n))
        crop_w, crop_h = (math.ceil((overlap * (n - 1) + side) / n) for side in (w, h))
        for i in range(n):
            for j in range(n):
                x0, y0 = int((crop_w - overlap) * i), int((crop_h - overlap) * j)
                crops.append(([x0, y0, min(x0 + crop_w, w), min(y0 + crop_h, h)], layer))
    return crops


def near_crop_edge(boxes: torch.Tensor, crop_box: list[int], image_size: tuple[int, int]) -> torch.Tensor:
    """(N,) True where an (N, 4) box in image pixels lies within 20 px of an edge of its crop that is not
    an edge of the image: such a mask is likely cut off by the crop."""
    h, w = image_size
    boxes = boxes.float()
    crop = torch.tensor(crop_box, dtype=torch.float, device=boxes.device)
    image = torch.tensor([0, 0, w, h], dtype=torch.float, device=boxes.device)
    near_crop = torch.isclose(boxes, crop[None], atol=EDGE_PIXELS, rtol=0)
    near_image = torch.isclose(boxes, image[None], atol=EDGE_PIXELS, rtol=0)
    return (near_crop & ~near_image).any(dim=1)
