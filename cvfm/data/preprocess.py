"""How a model wants its input, and its evaluation transform exactly as the model's own library builds it.

Libraries disagree on non-square images: which side is resized, whether the image is then cropped,
squashed or padded, which way a centre crop rounds an odd margin, PIL or tensor resizing. So `Preprocess`
records the geometry read from the model's own config and `library`, whose conventions (for timm and
open_clip: whose code) the transform follows:

  cvfm          the built-in presets: the short side resized on the uint8 tensor (torchvision), a centre
                crop that rounds an odd margin as torchvision does
  transformers  transformers' image processors as `AutoImageProcessor` returns them (the torchvision
                backend), reproduced with the same torchvision ops: crop margins floored, the aspect ratio
                squashed (SigLIP, BLIP, ViT), the long side resized and the normalised image zero-padded at
                the bottom and right (SAM), the image resized as floats (DINOv3)
  timm          timm's `create_transform` of the model's data config (PIL; crop_mode center/squash/border)
  open_clip     open_clip's `image_transform` of the model's `PreprocessCfg` (PIL; resize_mode
                shortest/squash/longest)

`from_transformers`, `from_timm` and `from_open_clip` read those configs. A preprocess.json written
before `resize_mode` and `library` existed loads with the cvfm convention, its behaviour then.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from cvfm.errors import UsageError

LIBRARIES = ("cvfm", "transformers", "timm", "open_clip")
RESIZE_MODES = ("shortest", "squash", "longest")
TIMM_CROP_MODES = {"center": "shortest", "squash": "squash", "border": "longest"}  # timm's names -> ours
TIMM_CROP_MODE_OF = {ours: theirs for theirs, ours in TIMM_CROP_MODES.items()}


@dataclass(frozen=True)
class Preprocess:
    """A `size` x `size` input normalised with `mean` / `std`, made as `library` makes it.

    `resize_mode` "shortest" resizes the short side to size / crop_pct, then centre-crops; "squash" resizes
    both sides to size / crop_pct (the aspect ratio is lost), then centre-crops; "longest" resizes the long
    side to size / crop_pct, then pads to a square: centred with grey level `fill` (open_clip's fill_color;
    timm pads with the mean colour), or, for transformers (SAM), with zeros after normalising, at the
    bottom and right. `resize_dtype` "float32" resizes the image rescaled to [0, 1] (DINOv3's processor),
    "uint8" the 8-bit image."""

    size: int = 224
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 1.0
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill: int = 0
    resize_dtype: str = "uint8"
    library: str = "cvfm"

    def __post_init__(self):
        if self.library not in LIBRARIES:
            raise ValueError(f"library '{self.library}' is not one of {', '.join(LIBRARIES)}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode '{self.resize_mode}' is not one of {', '.join(RESIZE_MODES)}")
        if self.resize_dtype not in ("uint8", "float32"):
            raise ValueError(f"resize_dtype '{self.resize_dtype}' is not uint8 or float32")
        if self.library == "cvfm" and self.resize_mode != "shortest":
            raise ValueError("the cvfm convention resizes the shortest side only")
        if self.resize_dtype == "float32" and self.library != "transformers":
            raise ValueError("only transformers processors resize float images")
        if self.fill and self.library != "open_clip":
            raise ValueError("only open_clip pads with a fill colour of its choice")
        sam = self.library == "transformers" and self.resize_mode == "longest"
        if self.crop_pct != 1.0 and (self.library == "open_clip" or sam):
            raise ValueError(f"{self.library} resize_mode '{self.resize_mode}' takes no crop_pct")

    @classmethod
    def from_dict(cls, d: dict) -> Preprocess:
        """From `asdict(...)`'s JSON (lists back to tuples); keys this cvfm does not know are an error."""
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown keys {', '.join(sorted(unknown))}")
        return cls(**{**d, "mean": tuple(d["mean"]), "std": tuple(d["std"])})

    def transform(self) -> Callable:
        """The deterministic evaluation transform: PIL image -> normalised (3, size, size) float tensor."""
        if self.library == "timm":
            from timm.data import create_transform

            return create_transform(
                input_size=(3, self.size, self.size),
                is_training=False,
                interpolation=self.interpolation,
                mean=self.mean,
                std=self.std,
                crop_pct=self.crop_pct,
                crop_mode=TIMM_CROP_MODE_OF[self.resize_mode],
            )
        if self.library == "open_clip":
            from open_clip.transform import image_transform

            return image_transform(
                self.size,
                is_train=False,
                mean=self.mean,
                std=self.std,
                resize_mode=self.resize_mode,
                interpolation=self.interpolation,
                fill_color=self.fill,
            )
        return self._tensor_transform()

    def _tensor_transform(self) -> T.Compose:
        """cvfm's and transformers' conventions: torchvision's tensor ops, as transformers uses them."""
        side = int(round(self.size / self.crop_pct))
        interpolation = InterpolationMode(self.interpolation)
        if self.resize_mode == "longest":
            resize = ResizeLongest(side, interpolation)
        else:
            square = self.resize_mode == "squash"
            resize = T.Resize((side, side) if square else side, interpolation, antialias=True)
        to_float = T.ToDtype(torch.float32, scale=True)
        if self.library == "cvfm":  # cvfm's evaluation transform as it always was
            return T.Compose(
                [T.ToImage(), resize, T.CenterCrop(self.size), to_float, T.Normalize(self.mean, self.std)]
            )
        floats = self.resize_dtype == "float32"
        ops = [T.ToImage(), to_float, resize] if floats else [T.ToImage(), resize]
        normalize = RescaleNormalize(self.mean, self.std, rescale=not floats)
        if self.resize_mode == "longest":  # SAM: normalise, then zero-pad the bottom and right
            return T.Compose(ops + [normalize, PadEnd(self.size)])
        return T.Compose(ops + [CenterCropFloor(self.size), normalize])


def adapt(x: torch.Tensor, source: Preprocess, target: Preprocess) -> torch.Tensor:
    """Images (B, 3, H, W) normalised for `source` -> `target`'s (square) size and normalisation (a teacher's
    or a backbone's input made from another model's); `x` itself when the two are the same."""
    if source == target:
        return x
    as_4d = lambda v: torch.tensor(v, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)  # noqa: E731
    pixels = x * as_4d(source.std) + as_4d(source.mean)
    if target.size != x.shape[-1] or target.size != x.shape[-2]:
        pixels = torch.nn.functional.interpolate(
            pixels, size=(target.size, target.size), mode="bilinear", antialias=True
        )
    return (pixels - as_4d(target.mean)) / as_4d(target.std)


class ResizeLongest:
    """SAM's resize: the long side to `side`, the short side rounded half up."""

    def __init__(self, side: int, interpolation: InterpolationMode):
        self.side, self.interpolation = side, interpolation

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        scale = self.side / max(h, w)
        size = [int(h * scale + 0.5), int(w * scale + 0.5)]
        return TF.resize(x, size, interpolation=self.interpolation, antialias=True)


class CenterCropFloor:
    """transformers' centre crop: a smaller image is zero-padded around (as torchvision pads), and an odd
    margin is floored (torchvision's CenterCrop rounds it, half to even)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        s = self.size
        h, w = x.shape[-2:]
        if h < s or w < s:
            x = TF.center_crop(x, [max(h, s), max(w, s)])
            h, w = x.shape[-2:]
        return TF.crop(x, (h - s) // 2, (w - s) // 2, s, s)


class RescaleNormalize:
    """transformers' fused rescale and normalise: (x - 255 mean) / (255 std) on the uint8 values, or a plain
    normalise of an image already rescaled (`rescale=False`)."""

    def __init__(self, mean, std, rescale: bool = True):
        factor = 1.0 / (1 / 255) if rescale else 1.0  # transformers' expression: equal to the last bit
        self.mean, self.std = torch.tensor(mean) * factor, torch.tensor(std) * factor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return TF.normalize(x.to(torch.float32), self.mean, self.std)


class PadEnd:
    """Zero-pad the bottom and right up to `size` x `size` (transformers' `pad`)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        return TF.pad(x, [0, 0, self.size - w, self.size - h], fill=0)


# ------------------------------------------------------------------------------------- reading the configs


def from_transformers(proc) -> Preprocess:
    """The `Preprocess` of a transformers image processor (`AutoImageProcessor.from_pretrained`'s): the
    torchvision-backend processors built on transformers' generic pipeline (CLIP, SigLIP, BLIP, BiT as
    DINOv2 uses it, ViT, DeiT, ...), DINOv3's, SAM's and ConvNeXt's. Others are refused: cvfm would not
    preprocess as they do."""
    import transformers
    from transformers.image_utils import PILImageResampling, pil_torch_interpolation_mapping

    name = type(proc).__name__

    def unsupported(what: str) -> UsageError:
        return UsageError(f"cvfm cannot preprocess images as {name} does ({what})")

    backend = getattr(transformers, "TorchvisionBackend", None)  # transformers 5
    if backend is None or not isinstance(proc, backend):
        raise unsupported("cvfm follows the torchvision-backend processors of transformers 5")
    special = {getattr(transformers, n, None): n for n in _SPECIAL_PROCESSORS}
    kind = special.get(type(proc))
    own_steps = [step for step in _PIPELINE_STEPS if getattr(type(proc), step) is not getattr(backend, step)]
    if kind is None and own_steps and name not in _GENERIC_FOR_IMAGES:
        raise unsupported(
            f"its own {', '.join(own_steps)}; cvfm follows transformers' generic pipeline (CLIP, SigLIP, "
            "BLIP, BiT, ViT, ...) and the DINOv3, SAM and ConvNeXt processors"
        )
    if not proc.do_resize:
        raise unsupported("do_resize is off")
    if not proc.do_rescale or not math.isclose(proc.rescale_factor, 1 / 255):
        raise unsupported(f"do_rescale={proc.do_rescale}, rescale_factor={proc.rescale_factor}")
    mode, side, size = _geometry(kind, proc, unsupported)
    resample = PILImageResampling(proc.resample if proc.resample is not None else PILImageResampling.BILINEAR)
    mean, std = (proc.image_mean, proc.image_std) if proc.do_normalize else (0.0, 1.0)
    return Preprocess(
        size=size,
        mean=_three(mean),
        std=_three(std),
        crop_pct=size / side,
        interpolation=pil_torch_interpolation_mapping[resample].value,
        resize_mode=mode,
        resize_dtype="float32" if kind == "DINOv3ViTImageProcessor" else "uint8",
        library="transformers",
    )


def _geometry(kind: str, proc, unsupported) -> tuple[str, int, int]:
    """(resize mode, the side the resize aims at, the output size) of a processor."""
    size = proc.size
    if kind in ("SamImageProcessor", "ConvNextImageProcessor") and proc.do_center_crop:
        raise unsupported("do_center_crop is on")
    if kind == "SamImageProcessor":
        if not (proc.do_pad and size.longest_edge):
            raise unsupported(f"do_pad={proc.do_pad}, size {_present(size)}")
        return "longest", int(size.longest_edge), _square(proc.pad_size, unsupported)
    if kind == "ConvNextImageProcessor":
        edge = size.shortest_edge
        if not edge:
            raise unsupported(f"size {_present(size)}")
        if edge < 384:  # ConvNeXt's rule: below 384 px, resize the short side to edge / crop_pct and crop
            return "shortest", int(edge / proc.crop_pct), int(edge)
        return "squash", int(edge), int(edge)
    if getattr(proc, "do_pad", None):
        raise unsupported("do_pad is on")
    if size.shortest_edge and not size.longest_edge:
        mode, side = "shortest", int(size.shortest_edge)
    elif size.height and size.width:
        mode, side = "squash", _square(size, unsupported)
    else:
        raise unsupported(f"size {_present(size)}")
    return mode, side, _square(proc.crop_size, unsupported) if proc.do_center_crop else side


_SPECIAL_PROCESSORS = ("DINOv3ViTImageProcessor", "SamImageProcessor", "ConvNextImageProcessor")
# Processors whose own steps only add segmentation maps around the generic pipeline (images go through it
# unchanged): SAM 2's squashes to its square input.
_GENERIC_FOR_IMAGES = ("Sam2ImageProcessor",)
# A processor that overrides none of these steps runs transformers' generic pipeline.
_PIPELINE_STEPS = (
    "preprocess",
    "_preprocess",
    "_preprocess_image_like_inputs",
    "process_image",
    "resize",
    "center_crop",
    "rescale_and_normalize",
    "pad",
)


def _square(size, unsupported) -> int:
    if size is None or size.height is None or size.height != size.width:
        raise unsupported(f"a non-square size {_present(size)}")
    return int(size.height)


def _present(size) -> dict:
    return {k: v for k, v in dict(size or {}).items() if v is not None}


def _three(value) -> tuple[float, float, float]:
    values = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * 3
    return tuple(values)


def from_timm(cfg: dict) -> Preprocess:
    """From timm's data config (`resolve_data_config`): input size, crop_pct, crop_mode, interpolation."""
    crop_mode = cfg.get("crop_mode") or "center"
    if crop_mode not in TIMM_CROP_MODES:
        raise UsageError(f"timm crop_mode '{crop_mode}' is not one of {', '.join(TIMM_CROP_MODES)}")
    height, width = cfg["input_size"][-2:]
    if height != width:
        raise UsageError(f"timm model with non-square input {height}x{width} is not supported")
    return Preprocess(
        size=int(width),
        mean=_three(cfg["mean"]),
        std=_three(cfg["std"]),
        crop_pct=float(cfg["crop_pct"]),
        interpolation=cfg["interpolation"],
        resize_mode=TIMM_CROP_MODES[crop_mode],
        library="timm",
    )


def from_open_clip(cfg: dict) -> Preprocess:
    """From open_clip's `visual.preprocess_cfg` (its `PreprocessCfg` fields)."""
    size = cfg.get("size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise UsageError(f"open_clip model with non-square input {tuple(size)} is not supported")
        size = size[0]
    interpolation = cfg.get("interpolation") or "bicubic"
    return Preprocess(
        size=int(size),
        mean=_three(cfg["mean"]),
        std=_three(cfg["std"]),
        # "random" is a training option: open_clip's evaluation transform then resizes bicubic
        interpolation="bilinear" if interpolation == "bilinear" else "bicubic",
        resize_mode=cfg.get("resize_mode") or "shortest",
        fill=int(cfg.get("fill_color") or 0),
        library="open_clip",
    )
