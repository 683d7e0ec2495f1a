"""cvfm's own folder layouts that hold other models: a classifier (classifier.json + backbone/), a paired
encoder (paired.json + image/ + text/) and a SAM with a cvfm backbone (segmenter.json + encoder/); their parts
load through the registry again."""

from __future__ import annotations

from pathlib import Path

from cvfm.models.backbone_sam import BackboneSegmenter
from cvfm.models.classifier import Classifier, load_classifier
from cvfm.models.paired import PairedEncoder
from cvfm.registry.source import IMAGE, IMAGE_TEXT, Request


def load_classifier_folder(folder: str, request: Request) -> Classifier:
    return load_classifier(folder, lambda backbone: request.load(backbone, IMAGE, model_id=backbone))


def load_paired(folder: str, request: Request) -> PairedEncoder:
    return PairedEncoder.load(
        Path(folder),
        request.model_id,
        load_encoder=lambda part: request.load(part, IMAGE, model_id=part),
        load_dual=lambda part: request.load(part, IMAGE_TEXT, model_id=part),
        pretrained=request.pretrained,
    )


def load_backbone_segmenter(folder: str, request: Request) -> BackboneSegmenter:
    return BackboneSegmenter.load(
        Path(folder), request.model_id, lambda part: request.load(part, IMAGE, model_id=str(part))
    )
