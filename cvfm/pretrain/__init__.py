"""Pre-training: the `cvfm pretrain` application over the shared training loop (`cvfm.runtime.loop`)."""

from cvfm.pretrain.config import PretrainConfig
from cvfm.pretrain.run import pretrain

__all__ = ["PretrainConfig", "pretrain"]
