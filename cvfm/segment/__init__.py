"""Segment Anything's automatic mask generation (`generate_masks`) and its output formats (writers.py)."""

from cvfm.segment.auto import AutoSettings, generate_masks, generate_masks_batch

__all__ = ["AutoSettings", "generate_masks", "generate_masks_batch"]
