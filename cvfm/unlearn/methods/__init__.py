"""Approximate unlearning methods, each a small module over the shared loop (`cvfm.unlearn.loop`).

| name         | passes per epoch                            | lr (at batch) | auto epochs | paper         |
|--------------|---------------------------------------------|---------------|-------------|---------------|
| finetune     | retain: CE                                  | 0.01 (256)    | 10 per 182  | Warnecke 2023 |
| neggrad+     | retain+forget: b CE(r) - (1 - b) CE(f)      | 0.01 (256)    | 10 per 182  | Kurmanji 2023 |
| random-label | forget: CE(random labels); retain: CE       | 0.01 (256)    | 10 per 182  | Golatkar 2020 |
| l1-sparse    | retain: CE + gamma_t * l1(weights)          | 0.01 (256)    | 10 per 182  | Jia 2023      |
| salun        | random-label on the salient weights only    | 0.013 (256)   | 10 per 182  | Fan 2024      |
| scrub        | forget: -KL (first msteps); retain: CE + KL | 5e-4 (128)    | 3, msteps 2 | Kurmanji 2023 |

All use SGD with momentum 0.9 and weight decay 5e-4 and a constant learning rate scaled linearly with the
batch size; `epochs` "auto" scales the papers' unlearning epochs to the original model's training length
(see `cvfm.unlearn.methods.base`).
"""

from cvfm.errors import UsageError
from cvfm.methods.base import configure
from cvfm.unlearn.methods.base import UnlearnConfig, UnlearnMethod
from cvfm.unlearn.methods.finetune import Finetune
from cvfm.unlearn.methods.l1_sparse import L1Sparse
from cvfm.unlearn.methods.neggrad import NegGradPlus
from cvfm.unlearn.methods.random_label import RandomLabel
from cvfm.unlearn.methods.salun import SalUn
from cvfm.unlearn.methods.scrub import Scrub

METHODS: dict[str, type[UnlearnMethod]] = {
    cls.name: cls for cls in (Finetune, NegGradPlus, RandomLabel, L1Sparse, SalUn, Scrub)
}


def build_unlearn_method(name: str, options: dict[str, str] | None = None) -> UnlearnMethod:
    """The method registered as `name`, its defaults overridden by `--opt key=value` strings."""
    if name not in METHODS:
        raise UsageError(f"unknown unlearning method '{name}' (choose from: {', '.join(METHODS)})")
    cls = METHODS[name]
    try:
        cfg = configure(cls.config_cls, options or {})
    except UsageError as e:
        raise UsageError(f"{name}: {e}") from None
    return cls(cfg)


__all__ = ["METHODS", "UnlearnConfig", "UnlearnMethod", "build_unlearn_method"]
