"""Turn any image file or object into an upright 8-bit RGB picture, or fail with a clear reason."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from cvfm.errors import CvfmError

# Larger than any real photo we expect; PIL raises DecompressionBombError above twice this.
MAX_PIXELS = 178_956_970
BACKGROUND = (255, 255, 255)


class DecodeError(CvfmError):
    """An image that is missing, truncated, not an image, or too large to decode safely."""


def decode_image(source: str | Path | bytes | Image.Image, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read `source` (a path, encoded bytes, or a PIL image) into an RGB image, EXIF-rotated."""
    try:
        if isinstance(source, Image.Image):
            img = source
        else:
            fp = io.BytesIO(source) if isinstance(source, bytes) else source
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
                if img.width * img.height > max_pixels:
                    raise DecodeError(f"{img.width}x{img.height} pixels is over the {max_pixels} limit")
                img.load()
        return to_rgb(ImageOps.exif_transpose(img))
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError("file not found") from None
    except (
        OSError,
        ValueError,
        SyntaxError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as e:
        raise DecodeError(f"cannot decode image: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert every PIL mode to RGB: alpha is composited on white, 16/32-bit and float are rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I") and arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr, peak = arr - lo, max(hi - lo, 1e-12)
        arr = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")
