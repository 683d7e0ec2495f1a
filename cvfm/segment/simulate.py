"""SAM's simulated annotator for training (Kirillov et al. 2023, appendix A, "Training algorithm"): the first
prompt of an object is, with equal odds, a point drawn uniformly from its mask or its box with noise (each
coordinate moved by N(0, (10% of the side)^2), at most 20 pixels); every next click is drawn uniformly
from the error region between the prediction and the mask, positive where the prediction missed the
object, negative where it spilled over.

Everything happens in the model's input frame (the resized image; the padding is never clicked), on P
objects at once. Randomness comes from torch's global generator (and a numpy generator drawn from it), which
the training loop seeds at every step, so a resumed run draws the same prompts.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import masks_to_boxes

from cvfm.eval.segmentation import jitter_box

NOT_A_POINT = -1  # SAM's label for a point that is none (nothing left to correct)


def sample_points(regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pixel drawn uniformly from each of the (P, H, W) boolean regions: (P, 2) float x, y (column,
    row) and (P,) whether the region had any pixel (an empty region gives 0, 0)."""
    flat = regions.flatten(1)
    draws = torch.rand(flat.shape, device=regions.device).masked_fill_(~flat, -1.0)
    index = draws.argmax(1)  # the largest of i.i.d. uniform draws: every pixel of the region equally likely
    found = flat.any(1)
    width = regions.shape[-1]
    xy = torch.stack([index % width, index // width], dim=1).float()
    return xy * found[:, None], found


def valid_area(shapes: list[tuple[int, int]], size: int, device: torch.device | str) -> torch.Tensor:
    """(P, size, size) bool: the image part (`shapes[p]` = its (h, w)) of each padded input frame."""
    area = torch.zeros(len(shapes), size, size, dtype=torch.bool, device=device)
    for p, (h, w) in enumerate(shapes):
        area[p, :h, :w] = True
    return area


def noisy_boxes(masks: torch.Tensor, shapes: list[tuple[int, int]], rng: np.random.Generator) -> torch.Tensor:
    """(P, 4) x0, y0, x1, y1: each non-empty mask's tight box (x1, y1 its last column and row), every
    coordinate moved as SAM's training noise and kept inside the image part `shapes[p]` of the frame."""
    tight = masks_to_boxes(masks).cpu().numpy().astype(np.float64)
    noisy = [jitter_box(box, rng, shape) for box, shape in zip(tight, shapes, strict=True)]
    return torch.tensor(np.array(noisy), dtype=torch.float32, device=masks.device)


def corrective_clicks(
    masks: torch.Tensor, predicted: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next click on each of P objects: (P, 2) x, y drawn uniformly from where the (P, H, W) boolean
    prediction and mask disagree inside the image part `valid`, and (P,) labels: 1 where the mask is
    (a missed pixel), 0 where it is not (a spilled one), NOT_A_POINT when they agree everywhere."""
    error = (masks ^ predicted) & valid
    xy, found = sample_points(error)
    rows, cols = xy[:, 1].long(), xy[:, 0].long()
    inside = masks[torch.arange(len(masks), device=masks.device), rows, cols]
    labels = torch.where(found, inside.long(), torch.full_like(rows, NOT_A_POINT))
    return xy, labels
