"""Self-supervised objectives; each is a small module wiring views, heads and a loss."""

from cvfm.errors import UsageError
from cvfm.methods.base import Budget, Method, configure
from cvfm.methods.byol import BYOL, BYOLConfig
from cvfm.methods.dino import DINO, DINOConfig
from cvfm.methods.simclr import SimCLR, SimCLRConfig

METHODS: dict[str, tuple[type[Method], type]] = {
    "simclr": (SimCLR, SimCLRConfig),
    "byol": (BYOL, BYOLConfig),
    "dino": (DINO, DINOConfig),
}


def build_method(name: str, encoder, options: dict, budget: Budget) -> Method:
    if name not in METHODS:
        raise UsageError(f"unknown method '{name}' (choose from: {', '.join(METHODS)})")
    cls, config_cls = METHODS[name]
    return cls(encoder, configure(config_cls, options), budget)


__all__ = ["METHODS", "Budget", "Method", "build_method"]
