"""Segment Anything features over the `Segmenter` face: prompts (prompt_run.py), text prompts (text.py),
automatic masks of a whole source (auto_run.py) and their output formats (writers.py), an embedding cache
and ONNX export. The automatic mask generator itself is `cvfm.models.amg`."""

from cvfm.models.amg import AutoSettings, generate_masks, generate_masks_batch

__all__ = ["AutoSettings", "generate_masks", "generate_masks_batch"]
