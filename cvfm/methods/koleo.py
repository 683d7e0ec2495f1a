"""KoLeo (Sablayrolles et al. 2019), DINOv2's regulariser: it spreads a batch's embeddings over the sphere by
pushing each one away from its nearest neighbour."""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8  # koleo_loss.py's, in the normalisation, the distance and the log


def koleo_loss(x: torch.Tensor) -> torch.Tensor:
    """-mean(log d_i), d_i the distance from L2-normalised row i of `x` (B, D) to its nearest other row."""
    x = F.normalize(x.float(), dim=-1, eps=EPS)
    with torch.no_grad():
        nearest = (x @ x.t()).fill_diagonal_(-2.0).argmax(dim=1)  # the largest dot product: the nearest
    distances = F.pairwise_distance(x, x[nearest], eps=EPS)
    return -torch.log(distances + EPS).mean()
