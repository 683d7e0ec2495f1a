"""`cvfm distill`: a frozen teacher into a student on the shared training loop (`cvfm.runtime.loop`)."""

from cvfm.distill.config import DistillConfig
from cvfm.distill.run import distill

__all__ = ["DistillConfig", "distill"]
