"""SSCD (Pizzi et al. 2022), a copy-detection descriptor: InfoNCE at a low temperature plus a differential
entropy regulariser that pushes each embedding away from its nearest other image, on copy-edit views.

As sscd-copy-detection's torchvision variant, the descriptor is the encoder's own L2-normalised embedding
(no projector), so `cvfm embed RUN` gives the descriptor that was trained. Its text and emoji overlays and
mixup are left out; inference-time whitening and score normalisation too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cvfm.data.views import MultiView, copy_edit
from cvfm.methods.base import Method, feature_std, gather_rows
from cvfm.methods.simclr import nt_xent


@dataclass
class SSCDConfig:
    temperature: float = 0.05  # train.py --infonce_temperature
    entropy_weight: float = 30.0  # train.py --entropy_weight
    min_scale: float = 0.08  # RandomResizedCrop's default, as its "advanced" augmentations
    jpeg_p: float = 0.2  # JPEG re-encoding at quality 1-100, as its "advanced" augmentations


def sscd_loss(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, entropy_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(InfoNCE, weighted entropy term) over 2N views of N images; with several processes the other
    processes' rows are negatives too.

    InfoNCE: each view's positive is the other view of its image against every view of other images.
    Entropy: -mean log of the distance from each view to its nearest view of another image (sscd's
    `closest_distance`, from the cosine similarity of unit vectors).
    """
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    everyone, offset = gather_rows(z)
    rows = torch.arange(2 * n, device=z.device)
    image = torch.cat([rows[:n], rows[:n]])  # the image each local view comes from
    local = torch.arange(everyone.shape[0], device=z.device) - offset  # a column's local row, if it is one
    mine = (local >= 0) & (local < 2 * n)
    column_image = torch.where(mine, image[local.clamp(0, 2 * n - 1)], -1)
    same_image = image[:, None] == column_image[None, :]
    nearest_other = (z @ everyone.T).masked_fill(same_image, -100.0).max(dim=1).values
    distance = (2 - 2 * nearest_other).clamp(min=1e-6).sqrt()
    infonce = nt_xent(z1, z2, temperature)  # with two views per image, SSCD's InfoNCE is SimCLR's NT-Xent
    return infonce, -distance.log().mean() * entropy_weight


class SSCD(Method):
    base_lr = 2e-3
    weight_decay = (1e-6, 1e-6)  # train.py --weight_decay
    summary_keys = ("feature_std", "entropy")

    def views(self) -> MultiView:
        t = copy_edit(self.encoder.preprocess, min_scale=self.cfg.min_scale, jpeg_p=self.cfg.jpeg_p)
        return MultiView([t, t])

    def forward(self, batch, step):
        h = self.encoder(torch.cat(batch["image"][:2]))
        z1, z2 = h.chunk(2)
        infonce, entropy = sscd_loss(z1, z2, self.cfg.temperature, self.cfg.entropy_weight)
        return infonce + entropy, {"feature_std": feature_std(h), "entropy": float(entropy.detach())}
