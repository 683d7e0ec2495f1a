"""Self-supervised and image-text objectives, BLIP's fine-tuning and supervised fine-tuning of a classifier;
each is a small module wiring views, heads and a loss."""

from cvfm.errors import UsageError
from cvfm.methods.base import Budget, Method, configure
from cvfm.methods.blip import BLIPCaptioner, BLIPCaptionerConfig, BLIPFilter, BLIPFilterConfig
from cvfm.methods.byol import BYOL, BYOLConfig
from cvfm.methods.clip import CLIP, CLIPConfig
from cvfm.methods.dino import DINO, DINOConfig
from cvfm.methods.dinov2 import DINOv2, DINOv2Config
from cvfm.methods.ibot import IBOT, IBOTConfig
from cvfm.methods.mae import MAE, MAEConfig
from cvfm.methods.simclr import SimCLR, SimCLRConfig
from cvfm.methods.sscd import SSCD, SSCDConfig
from cvfm.methods.supervised import Supervised, SupervisedConfig

METHODS: dict[str, tuple[type[Method], type]] = {
    "simclr": (SimCLR, SimCLRConfig),
    "byol": (BYOL, BYOLConfig),
    "dino": (DINO, DINOConfig),
    "ibot": (IBOT, IBOTConfig),
    "dinov2": (DINOv2, DINOv2Config),
    "mae": (MAE, MAEConfig),
    "sscd": (SSCD, SSCDConfig),  # a copy-detection descriptor, for `cvfm curate dedup`
    "clip": (CLIP, CLIPConfig),
    "blip-captioner": (BLIPCaptioner, BLIPCaptionerConfig),  # BLIP fine-tuning before CapFilt
    "blip-filter": (BLIPFilter, BLIPFilterConfig),
    "supervised": (Supervised, SupervisedConfig),  # the classifier that `cvfm finetune` trains
}


def method_class(name: str) -> type[Method]:
    """The class registered as `name` (its `model_kind` and `default_model` steer `cvfm pretrain`)."""
    if name not in METHODS:
        raise UsageError(f"unknown method '{name}' (choose from: {', '.join(METHODS)})")
    return METHODS[name][0]


def build_method(name: str, encoder, options: dict, budget: Budget) -> Method:
    cls, config_cls = method_class(name), METHODS[name][1]
    return cls(encoder, configure(config_cls, options), budget)


__all__ = ["METHODS", "Budget", "Method", "build_method", "method_class"]
