"""cvfm: one toolkit for computer-vision foundation models (pre-train, embed, evaluate)."""

__version__ = "0.1.0"

from cvfm.errors import CvfmError, UsageError  # noqa: E402
from cvfm.registry import create_encoder, list_models  # noqa: E402

__all__ = ["CvfmError", "UsageError", "__version__", "create_encoder", "list_models"]
