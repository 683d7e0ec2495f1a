"""CLIP (Radford et al. 2021): contrastive image-text pre-training of a dual encoder.

Symmetric InfoNCE over L2-normalised image and text embeddings with a learnable logit scale (log of
1 / temperature, initialised at ln(1 / 0.07) and clamped at ln(100) after every step, as in the paper
and open_clip). Defaults follow open_clip's training script: AdamW betas (0.9, 0.98), weight decay 0.2
(none on the logit scale, biases, norms and embeddings of ndim <= 1), one RandomResizedCrop view.

Negatives are the other pairs of the global batch (batch size x processes). With --grad-accum each
micro-batch is contrasted on its own: accumulation averages gradients but does not enlarge the set of
negatives (open_clip's feature-caching `accum_freq` would).

The dual encoder is an image-text model (`--model`, default cvfm/tiny-clip), or any image encoder paired
with the text half of one (`--model <image encoder> --text-model <image-text model>`, a `PairedEncoder`:
a linear projection onto the text embedding space and its own logit scale).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from cvfm.data.loader import collate
from cvfm.data.views import MultiView, Preprocess
from cvfm.methods.base import Method, feature_std, gather_with_grad, need

MAX_LOGIT_SCALE = math.log(100)  # open_clip: logit_scale.clamp_(0, math.log(100))


@dataclass
class CLIPConfig:
    # open_clip trains with RandomResizedCrop(scale=(0.9, 1.0)) and nothing else. On 32 px images that
    # is a one or two pixel jitter; we keep it: colour is half of every caption, so no colour jitter or
    # grayscale, and no flips (a mirrored digit is not that digit).
    min_scale: float = 0.9


def clip_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy over the image-text similarity matrix; pair i is the positive of row i.

    logits = exp(logit_scale) * normalise(images) @ normalise(texts).T. With several processes, the
    local rows are scored against every process's features (`gather_with_grad`) and the targets are
    offset by rank x local batch (open_clip's ClipLoss with gather_with_grad=True, local_loss=True):
    the mean over processes is the loss of one big batch, and so is the gradient after DDP averages it.
    """
    img = F.normalize(image_feats, dim=-1)
    txt = F.normalize(text_feats, dim=-1)
    all_img, all_txt = gather_with_grad(img), gather_with_grad(txt)
    offset = 0
    if all_img.shape[0] != img.shape[0]:  # this process's rows sit at rank * n
        import torch.distributed as dist

        offset = dist.get_rank() * img.shape[0]
    scale = logit_scale.exp()
    targets = torch.arange(img.shape[0], device=img.device) + offset
    per_image = F.cross_entropy(scale * img @ all_txt.T, targets)
    per_text = F.cross_entropy(scale * txt @ all_img.T, targets)
    return (per_image + per_text) / 2


def light_view(pre: Preprocess, min_scale: float) -> T.Compose:
    """One RandomResizedCrop of area (min_scale, 1) at the model's size, then its normalisation."""
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(
                pre.size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(pre.mean, pre.std),
        ]
    )


class CLIP(Method):
    """`self.encoder` is a `DualEncoder` (a `PairedEncoder` too); `forward` takes the batch's views and its
    texts, tokenized by `collate_fn`."""

    model_kind = "dual"
    default_model = "cvfm/tiny-clip"
    # open_clip's default lr is 5e-4 at batch 32k for ViTs; from scratch at CPU batch sizes a higher
    # sqrt-scaled rate trains faster: 2e-3 at 256 (1.4e-3 at batch 128), see examples/clip_demo.sh.
    base_lr = 2e-3
    weight_decay = (0.2, 0.2)  # CLIP paper and open_clip
    adam_betas = (0.9, 0.98)  # CLIP paper / open_clip, for stability of the contrastive ViT
    summary_keys = ("feature_std", "logit_scale")

    def views(self) -> MultiView:
        return MultiView([light_view(self.encoder.preprocess, self.cfg.min_scale)])

    def collate_fn(self):
        """Tokenize the batch's texts in the DataLoader (its workers), into batch["tokens"]."""
        return functools.partial(collate, tokenizer=self.encoder.tokenizer)

    def forward(self, batch, step):
        tokens = need(batch, "tokens", "CLIP needs the batch's text tokens")
        img = self.encoder.encode_image(batch["image"][0])
        txt = self.encoder.encode_text(tokens)
        scale = self.encoder.logit_scale
        loss = clip_loss(img, txt, scale)
        return loss, {
            "logit_scale": float(scale.detach().exp()),
            "feature_std": feature_std(img),
            "text_feature_std": feature_std(txt),
        }

    @torch.no_grad()
    def after_optimizer_step(self, step):
        self.encoder.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
