"""Segment Anything: automatic masks, prompts, mask formats and export over the `Segmenter` face."""
