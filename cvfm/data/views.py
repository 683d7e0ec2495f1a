"""Augmented views for self-supervised methods.

Recipes follow the papers: SimCLR (Chen et al. 2020, App. A), BYOL (Grill et al. 2020, Table 6:
asymmetric blur/solarize), DINO's multi-crop (Caron et al. 2021, main_dino.py) and MAE's crop and flip
(He et al. 2022, main_pretrain.py). Blur is only used
for images of 64 px and more, as solo-learn's CIFAR recipes do: on tiny images it erases the content.
The evaluation transform is `Preprocess.transform()` (cvfm/data/preprocess.py; importable from here too).

A grey image stored as RGB (three equal channels: MNIST, Animal-MNIST, scans) is augmented as one channel
and repeated at the end. That is what torchvision does for a one-channel image: saturation, hue and
grayscale leave it as it is, where on three equal channels they cost most of a view's time and only
move values by a few levels of uint8 rounding. The random draws, and so the crops, are the same.
"""

from __future__ import annotations

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from cvfm.data.preprocess import Preprocess


class OneChannelIfGrey(T.Transform):
    """An image tensor whose three channels are equal, as its first channel (1, H, W); else unchanged."""

    def transform(self, inpt, params):
        first = inpt[..., :1, :, :]
        if inpt.shape[-3] == 3 and bool((inpt[..., 1:, :, :] == first).all()):
            return first
        return inpt


class Channels(T.Transform):
    """A one-channel image tensor repeated to `n` channels (the model's); others unchanged."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def transform(self, inpt, params):
        if inpt.shape[-3] == 1 and self.n != 1:
            return inpt.expand(*inpt.shape[:-3], self.n, *inpt.shape[-2:])
        return inpt


def _augment(pre: Preprocess, size: int, scale: tuple[float, float], blur_p: float, solarize_p: float):
    ops = [
        T.ToImage(),
        OneChannelIfGrey(),
        T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur_p > 0 and size >= 64:
        kernel = max(3, (size // 10) | 1)
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=solarize_p))
    ops += [Channels(len(pre.mean)), T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]
    return T.Compose(ops)


class MultiView:
    """Applies a list of transforms to one image and returns the list of views."""

    def __init__(self, transforms: list):
        self.transforms = transforms

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [t(img) for t in self.transforms]

    def __len__(self) -> int:
        return len(self.transforms)


def two_views(pre: Preprocess, *, min_scale: float = 0.08, asymmetric: bool = False) -> MultiView:
    """SimCLR (symmetric, blur p=0.5) or BYOL (asymmetric: blur 1.0/0.1, solarize 0/0.2) views."""
    if asymmetric:
        return MultiView(
            [
                _augment(pre, pre.size, (min_scale, 1.0), blur_p=1.0, solarize_p=0.0),
                _augment(pre, pre.size, (min_scale, 1.0), blur_p=0.1, solarize_p=0.2),
            ]
        )
    t = _augment(pre, pre.size, (min_scale, 1.0), blur_p=0.5, solarize_p=0.0)
    return MultiView([t, t])


def multi_crop(
    pre: Preprocess,
    *,
    local_crops: int,
    local_size: int,
    global_scale: tuple[float, float] = (0.4, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
) -> MultiView:
    """DINO's multi-crop: 2 global views (blur 1.0 / 0.1 + solarize 0.2) and N small local views."""
    g1 = _augment(pre, pre.size, global_scale, blur_p=1.0, solarize_p=0.0)
    g2 = _augment(pre, pre.size, global_scale, blur_p=0.1, solarize_p=0.2)
    local = _augment(pre, local_size, local_scale, blur_p=0.5, solarize_p=0.0)
    return MultiView([g1, g2] + [local] * local_crops)


def copy_edit(pre: Preprocess, *, min_scale: float = 0.08, jpeg_p: float = 0.2) -> T.Compose:
    """SSCD's "advanced" copy edits (sscd/transforms/settings.py) less its text and emoji overlays: a flip,
    a quarter turn (p 0.05), any rotation (p 0.05), a random resized crop, colour jitter 0.8/0.8/0.8/0.2
    (p 0.8), grayscale (p 0.2), blur of radius 1-5 (p 0.5; 64 px and more), JPEG at quality 1-100."""
    quarter_turns = [T.RandomRotation((angle, angle)) for angle in (90, 180, 270)]
    ops = [  # on three channels even for a grey image: JPEG codes one channel differently
        T.ToImage(),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.RandomChoice(quarter_turns)], p=0.05),
        T.RandomApply([T.RandomRotation((0, 359))], p=0.05),
        T.RandomResizedCrop(
            pre.size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True
        ),
        T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if pre.size >= 64:
        ops.append(T.RandomApply([T.GaussianBlur(max(3, (pre.size // 10) | 1), sigma=(1.0, 5.0))], p=0.5))
    if jpeg_p > 0:
        ops.append(T.RandomApply([T.JPEG((1, 100))], p=jpeg_p))
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(pre.mean, pre.std)]
    return T.Compose(ops)


def crop_flip(pre: Preprocess, *, min_scale: float = 0.2) -> MultiView:
    """MAE's one view (main_pretrain.py): a random resized crop (bicubic, scale 0.2-1) and a horizontal flip;
    no colour changes."""
    t = T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(
                pre.size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True
            ),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(pre.mean, pre.std),
        ]
    )
    return MultiView([t])
