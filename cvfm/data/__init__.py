"""Image sources (folder, JSONL, Hugging Face datasets, built-in sets), robust decoding and views."""

from cvfm.data.decode import DecodeError, decode_image
from cvfm.data.sources import ImageSource, open_source

__all__ = ["DecodeError", "ImageSource", "decode_image", "open_source"]
