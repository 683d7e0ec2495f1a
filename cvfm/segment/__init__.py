"""Segment Anything over the `Segmenter` face: automatic mask generation (`generate_masks`, auto.py) and its
output formats (writers.py), prompts (prompt_run.py), an embedding cache and ONNX export."""

from cvfm.segment.auto import AutoSettings, generate_masks, generate_masks_batch

__all__ = ["AutoSettings", "generate_masks", "generate_masks_batch"]
