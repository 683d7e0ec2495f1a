"""Segment anything: segment-anything's automatic mask generator over the `Segmenter` face (generator.py),
with the point grids and crops it prompts (crops.py) and the mask operations it needs (masks.py: COCO RLE,
boxes, stability, NMS, small-region cleanup). It sits with the models, below the features and the
evaluations, so `cvfm segment` and `cvfm evaluate segmentation` share it."""

from cvfm.models.amg.generator import AutoSettings, generate_masks, generate_masks_batch

__all__ = ["AutoSettings", "generate_masks", "generate_masks_batch"]
