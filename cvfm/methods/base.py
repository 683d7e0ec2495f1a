"""What every method provides to the shared training loop (`cvfm.runtime.protocol.TrainingMethod`)."""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from cvfm.data.loader import collate
from cvfm.data.sources import ImageSource
from cvfm.data.views import MultiView
from cvfm.errors import CvfmError, UsageError
from cvfm.models.dual import DualEncoder
from cvfm.models.encoder import Encoder
from cvfm.registry.presets import PRESETS
from cvfm.runtime.plan import Budget


class Method(nn.Module, abc.ABC):
    """A model plus heads and a loss. `forward(batch, step)` returns (loss, logs).

    `model_kind` names what `cvfm pretrain` builds as `self.encoder` from `--model` and the loop saves as
    the run's `export_dir`: "image" (an `Encoder`), "dual" (a `DualEncoder`, CLIP), "captioner" or
    "matcher" (BLIP's `Captioner` / `Matcher`), "classifier" (a `Classifier`: the encoder and a linear head
    over the data's classes, saved as classifier/). "dual", "captioner" and "matcher" train on image-text
    pairs (`needs_text`): the data is opened with its text column, and the batch holds the raw strings
    ("text") and, with the dual encoder's `collate_fn`, their "tokens". A method with `needs_labels` reads
    the batch's "label" and refuses unlabelled data.

    `frozen_teacher` (None unless given) is a module the method may call but never trains: it is kept out of
    the module tree (not in `state_dict()`, `parameters()`, checkpoints or the export), in eval mode and
    without grad; the loop moves it to the device. DINO's EMA `teacher` and BYOL's `target` are not frozen
    teachers: they move with every step and are checkpointed.

    A new method: copy `simclr.py` (a config dataclass, `views`, `forward`), register it in `METHODS`.
    """

    model_kind: str = "image"
    default_model: str = "cvfm/tiny-resnet"  # the registry id used when --model is left out
    export_dir: str = "backbone"  # the run's sub-folder the trained model is saved to
    needs_labels: bool = False
    summary_keys: tuple[str, ...] = ("feature_std",)  # the epoch means printed in each epoch's summary

    # AdamW learning rate at batch size 256, scaled by sqrt(batch / 256): the square-root rule suits Adam
    # (Malladi et al. 2022); linear scaling starves the small batches of CPU runs.
    base_lr: float = 1e-3
    weight_decay: tuple[float, float] = (0.05, 0.05)  # start, end of a cosine schedule
    clip_grad: float | None = None
    adam_betas: tuple[float, float] = (0.9, 0.999)  # torch's AdamW default

    @classmethod
    def needs_text(cls) -> bool:
        """The dual encoder and BLIP's faces train on image-text pairs."""
        return cls.model_kind in ("dual", "captioner", "matcher")

    def __init__(
        self, encoder: Encoder | DualEncoder, cfg, budget: Budget, frozen_teacher: nn.Module | None = None
    ):
        super().__init__()
        self.encoder, self.cfg, self.budget = encoder, cfg, budget
        self.resolved: dict = {}  # defaults resolved here, recorded in run.json "resolved"
        if frozen_teacher is not None:
            frozen_teacher.eval().requires_grad_(False)
        self.__dict__["frozen_teacher"] = frozen_teacher  # an attribute, not a submodule: see the docstring

    @abc.abstractmethod
    def views(self) -> MultiView:
        """The augmentation that turns one image into this method's list of views."""

    @abc.abstractmethod
    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, logs) for one batch: `batch["image"]` is the list of views, each a (B, C, H, W) tensor;
        "label", "text" (strings) and "tokens" (the dual encoder's) are there when the data has them."""

    def collate_fn(self) -> Callable[[list], dict]:
        """How the DataLoader stacks samples into the batch `forward` gets."""
        return collate

    def before_optimizer_step(self, step: int) -> None:
        """Hook after gradients exist, before the update (DINO freezes its last layer here)."""

    def after_optimizer_step(self, step: int) -> None:
        """Hook after the update (EMA targets move here)."""

    def after_training(self, folder: Path, source: ImageSource) -> None:
        """Hook once the trained model is exported to the run `folder`, before the run is marked finished
        (main process; `source`: the training data): MAE draws reconstructions.png here."""

    def peak_lr(self, batch_size: int) -> float:
        """The learning rate when --lr is left out: `base_lr` x sqrt(global batch / 256)."""
        return self.base_lr * math.sqrt(batch_size / 256)

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """AdamW over `param_groups()`; the trainer sets each step's lr and weight decay."""
        return torch.optim.AdamW(
            self.param_groups(), lr=lr, weight_decay=self.weight_decay[0], betas=self.adam_betas
        )

    def param_groups(self) -> list[dict]:
        """Trainable parameters; biases and norm weights get no weight decay (as in DINO and timm)."""
        decay, no_decay = split_decay((n, p) for n, p in self.named_parameters() if p.requires_grad)
        return [
            {"params": decay, "apply_wd": True},
            {"params": no_decay, "weight_decay": 0.0, "apply_wd": False},
        ]


def split_decay(named_parameters) -> tuple[list, list]:
    """(decayed, not decayed): biases and norm weights (1-d) get no weight decay, as in DINO and timm."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return decay, no_decay


def need(batch: dict, key: str, message: str):
    """`batch[key]`, or a ValueError: `message` says what the method needs it for."""
    value = batch.get(key)
    if value is None:
        raise ValueError(f"{message} (batch[{key!r}])")
    return value


def configure(config_cls, options: dict):
    """Build a method's config dataclass from `--opt key=value` strings, naming bad keys."""
    known = {f.name: f for f in fields(config_cls)}
    values = {}
    for key, raw in options.items():
        if key not in known:
            raise UsageError(f"unknown option '{key}' for this method (options: {', '.join(sorted(known))})")
        default = getattr(config_cls(), key)
        values[key] = _parse(raw, default, key, str(known[key].type))
    return config_cls(**values)


def _parse(raw, default, key, annotation: str = ""):
    """Parse a `--opt` string by the field's declared type (`bool | None`, `float`, `tuple`, ...)."""
    if not isinstance(raw, str):
        return raw
    try:
        if "None" in annotation and raw.lower() in ("none", "auto"):
            return None
        if "bool" in annotation:
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return raw.lower() in ("true", "1", "yes")
        if "float" in annotation:
            return float(raw)
        if "int" in annotation:
            return int(raw)
        if "tuple" in annotation:
            parts = tuple(float(v) for v in raw.split(","))
            if len(parts) != len(default):  # e.g. a crop scale needs (min, max)
                raise ValueError
            return parts
    except ValueError:
        raise UsageError(f"option {key}={raw!r}: expected a value like {default!r}") from None
    return raw


def mlp(dims: list[int], *, batch_norm: bool = True, last_bn: bool = False) -> nn.Sequential:
    """Linear layers with BN + ReLU between them (the projector / predictor of SimCLR and BYOL)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        last = i == len(dims) - 2
        layers.append(nn.Linear(a, b, bias=not (batch_norm and (not last or last_bn))))
        if not last or last_bn:
            layers.append(nn.BatchNorm1d(b, affine=not last) if batch_norm else nn.Identity())
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy that receives no gradients: the EMA target / teacher of BYOL and DINO."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- m * target + (1 - m) * online, all parameters in one fused call (as timm's ModelEmaV3)."""
    targets, onlines = list(target.parameters()), [p.detach() for p in online.parameters()]
    if len(targets) != len(onlines):
        raise ValueError("EMA target and online network have different parameters")
    torch._foreach_lerp_(targets, onlines, 1.0 - momentum)


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather across processes keeping gradients for the local slice (a no-op on one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)


def gather_rows(z: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every process's rows of `z` (equal-sized; gradients kept for this process's), and the index where
    this process's rows start among them (0 on one process)."""
    everyone = gather_with_grad(z)
    offset = dist.get_rank() * z.shape[0] if everyone.shape[0] != z.shape[0] else 0
    return everyone, offset


@torch.no_grad()
def feature_std(z: torch.Tensor) -> float:
    """Mean per-dimension std of L2-normalised features: 0 means collapse, ~1/sqrt(D) is healthy."""
    z = nn.functional.normalize(z.float(), dim=-1)
    return float(z.std(dim=0).mean()) if z.shape[0] > 1 else math.nan


def require_patch_masking(encoder: Encoder, method: str, drop: bool) -> None:
    """Masked image modelling needs a ViT that masks patch tokens: left out (`drop`, MAE) or replaced by the
    learned mask token (iBOT, DINOv2: added here). Anything else is a usage error that names
    the models that can."""
    size = encoder.preprocess.size
    try:
        if not drop:
            encoder.add_mask_token()
        rows, cols = encoder.token_grid(size, size)
        mask = torch.zeros(1, rows * cols, dtype=torch.bool)
        with torch.no_grad():
            encoder.encode(torch.zeros(1, 3, size, size), mask, drop=drop)
    except CvfmError:
        vits = ", ".join(k for k, p in PRESETS.items() if p.arch.startswith("vit"))
        how = "leave patches out" if drop else "replace patches by a mask token"
        raise UsageError(
            f"--method {method} masks a ViT's patch tokens, and '{encoder.name}' cannot {how}: use a ViT "
            f"with patch tokens ({vits}, a timm ViT such as timm/vit_small_patch16_224, or a run folder "
            "holding one)"
        ) from None
