"""One face for open-vocabulary (zero-shot) object detectors through transformers: OWL-ViT, OWLv2 and
Grounding DINO (with MM Grounding DINO). `detect(image, texts)` finds the texts in an image and returns
boxes in pixels of the original image, as the model's own processor prepares the inputs and
post-processes the outputs (`post_process_grounded_object_detection`).

OWL models score every text against every box in one pass and give each box its best text. Grounding DINO
reads the texts as one caption; to label each box with one of the texts, each text gets its own pass, as a
one-label caption (its processor lower-cases it and ends it with a dot: "a cat" -> "a cat.").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from cvfm.errors import CvfmError, UsageError

OWL = ("owlvit", "owlv2")
GROUNDING = ("grounding-dino", "mm-grounding-dino")
DETECTOR_TYPES = OWL + GROUNDING  # transformers model_type
# The usual box thresholds: transformers' OWL post-processing default (0.1) and Grounding DINO's demo
# `box_threshold` (0.35, IDEA-Research/GroundingDINO's README).
THRESHOLDS = {"owlvit": 0.1, "owlv2": 0.1, "grounding-dino": 0.35, "mm-grounding-dino": 0.35}


@dataclass
class Detections:
    """The boxes found in one image, best first (tensors on the CPU)."""

    boxes: torch.Tensor  # (N, 4) float x0, y0, x1, y1 in pixels of the original image (not clipped to it)
    scores: torch.Tensor  # (N,) the model's confidence in [0, 1]
    labels: torch.Tensor  # (N,) long: the index of each box's text

    def __len__(self) -> int:
        return len(self.scores)


class Detector(nn.Module):
    """An open-vocabulary detector and its processor: `detect(image, texts, threshold)`."""

    def __init__(self, model: nn.Module, processor, name: str):
        super().__init__()
        family = getattr(model.config, "model_type", None)
        if family not in DETECTOR_TYPES:
            raise CvfmError(
                f"'{name}' is a {type(model).__name__}, not an OWL-ViT, OWLv2 or Grounding DINO detector"
            )
        self.model, self.processor, self.name, self.family = model, processor, name, family

    @property
    def default_threshold(self) -> float:
        return THRESHOLDS[self.family]

    @torch.no_grad()
    def detect(self, image: Image.Image, texts: list[str], threshold: float | None = None) -> Detections:
        """The boxes of `texts` in `image` whose score exceeds `threshold` (default: the family's usual
        one, `default_threshold`)."""
        texts = [t.strip() for t in texts]
        if not texts or not all(texts):
            raise UsageError("give at least one non-empty text to detect")
        threshold = self.default_threshold if threshold is None else threshold
        image = image.convert("RGB")
        if self.family in OWL:
            return _sorted(*self._pass(image, texts, threshold))
        parts = [self._pass(image, [t], threshold) for t in texts]
        labels = [torch.full_like(scores, i, dtype=torch.long) for i, (_, scores, _) in enumerate(parts)]
        return _sorted(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), torch.cat(labels))

    def _pass(self, image: Image.Image, texts: list[str], threshold: float):
        """One forward pass and the processor's post-processing: boxes, scores and (OWL) text indices."""
        device = next(self.model.parameters()).device
        inputs = self.processor(images=image, text=texts, return_tensors="pt", truncation=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        outputs = self.model(**inputs)
        extra = {} if self.family in OWL else {"input_ids": inputs["input_ids"]}
        size = [(image.height, image.width)]
        found = self.processor.post_process_grounded_object_detection(
            outputs, threshold=threshold, target_sizes=size, **extra
        )[0]
        labels = found["labels"] if self.family in OWL else None  # Grounding DINO's are phrases
        return found["boxes"].float().cpu(), found["scores"].float().cpu(), labels

    def save(self, folder: str | Path) -> Path:
        """transformers' layout (safetensors weights, processor), loadable by `create_detector(folder)`."""
        folder = Path(folder)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.processor.save_pretrained(folder)
        return folder


def _sorted(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> Detections:
    order = scores.argsort(descending=True, stable=True)
    return Detections(boxes[order], scores[order], labels.long().cpu()[order])
