"""The open-vocabulary detector face (OWLv2, OWL-ViT, Grounding DINO): saved with its processor, loaded
through `create_detector`, equal to calling the transformers model and its processor's post-processing.
Tiny random models built offline (random weights: equality, not quality)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cvfm.errors import UsageError
from cvfm.models.detector import Detector
from cvfm.registry import create_detector, create_segmenter

TEXTS = ["a red giraffe", "a cat"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread on the shared CPU makes a pass 10-50x slower
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (61, 97, 3), dtype=np.uint8))  # odd, non-square


def tiny_owlvit():
    """A random OwlViTForObjectDetection with its processor (64 px, square resize and crop)."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    from cvfm.models.tiny_clip import build_tokenizer, text_ids

    tokenizer = build_tokenizer(16)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = OwlViTConfig(
        text_config={**tower, **text_ids(tokenizer, 16)},
        vision_config={**tower, "image_size": 64, "patch_size": 8},
        projection_dim=32,
        initializer_factor=0.1,
    )
    torch.manual_seed(0)
    square = {"height": 64, "width": 64}
    processor = OwlViTProcessor(OwlViTImageProcessor(size=square, crop_size=square), tokenizer)
    return OwlViTForObjectDetection(config).eval(), processor


def tiny_grounding_dino():
    """A random GroundingDinoForObjectDetection (Swin and BERT towers a few channels wide) with its processor;
    the BERT tokenizer is cvfm/tiny-blip's, built offline (no hub download)."""
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    from cvfm.models.tiny_blip import build_tokenizer

    tokenizer = build_tokenizer(32)
    swin = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 1, 1], "window_size": 2}
    bert = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    config = GroundingDinoConfig(
        backbone_config={"model_type": "swin", **swin, "image_size": 64, "out_indices": [2, 3, 4]},
        text_config={
            "model_type": "bert",
            **bert,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 32,
        },
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # transformers ties the box heads of the decoder layers: one layer cannot load
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        num_queries=20,
        max_text_len=32,
    )
    torch.manual_seed(0)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    processor = GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer)
    return GroundingDinoForObjectDetection(config).eval(), processor


def tiny_owlv2():
    from cvfm.models.tiny_owl import build_tiny_owlv2

    return build_tiny_owlv2()


def _direct(model, processor, image, texts, threshold, grounding):
    """Boxes, scores and labels as transformers' own calls give them, best first (labels: text index)."""
    size = [(image.height, image.width)]
    with torch.no_grad():
        if not grounding:  # OWL: all texts in one pass
            inputs = processor(images=image, text=[texts], return_tensors="pt")
            found = processor.post_process_grounded_object_detection(
                model(**inputs), threshold=threshold, target_sizes=size
            )[0]
            boxes, scores, labels = found["boxes"], found["scores"], found["labels"]
        else:  # Grounding DINO: one caption per text, given as a list of labels ("a cat" -> "a cat.")
            parts = []
            for t, text in enumerate(texts):
                inputs = processor(images=image, text=[text], return_tensors="pt")
                found = processor.post_process_grounded_object_detection(
                    model(**inputs), inputs.input_ids, threshold=threshold, target_sizes=size
                )[0]
                parts.append((found["boxes"], found["scores"], torch.full_like(found["scores"], t).long()))
            boxes, scores, labels = (torch.cat(x) for x in zip(*parts, strict=True))
    order = scores.argsort(descending=True, stable=True)
    return boxes[order], scores[order], labels[order]


@pytest.mark.parametrize(
    "build, grounding, threshold",
    [(tiny_owlv2, False, 0.5), (tiny_owlvit, False, 0.5), (tiny_grounding_dino, True, 0.3)],
    ids=["owlv2", "owlvit", "grounding-dino"],
)
def test_saved_detector_loads_through_the_registry_and_equals_transformers(
    build, grounding, threshold, image, tmp_path
):
    from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

    model, processor = build()
    folder = Detector(model, processor, "tiny").save(tmp_path / "detector")
    detector = create_detector(str(folder))
    assert isinstance(detector, Detector) and detector.family == model.config.model_type
    found = detector.detect(image, TEXTS, threshold)

    again = AutoModelForZeroShotObjectDetection.from_pretrained(folder).eval()
    boxes, scores, labels = _direct(
        again, AutoProcessor.from_pretrained(folder), image, TEXTS, threshold, grounding
    )
    assert 0 < len(found) < len(detector.detect(image, TEXTS, 0.0))  # the threshold keeps some boxes
    torch.testing.assert_close(found.scores, scores.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(found.boxes, boxes.float(), rtol=0, atol=1e-4)
    assert found.labels.tolist() == labels.tolist()
    assert set(found.labels.tolist()) <= {0, 1} and bool((found.scores > threshold).all())


def test_tiny_owlv2_preset_is_seeded_and_family_defaults_apply(image):
    a, b = create_detector("cvfm/tiny-owlv2"), create_detector("cvfm/tiny-owlv2")
    assert a.default_threshold == 0.1
    first, second = a.detect(image, TEXTS), b.detect(image, TEXTS)
    assert torch.equal(first.boxes, second.boxes) and torch.equal(first.scores, second.scores)
    assert bool((first.scores > 0.1).all()) and first.scores.tolist() == sorted(
        first.scores.tolist(), reverse=True
    )
    assert len(a.detect(image, TEXTS, threshold=0.6)) < len(first)


def test_detector_errors(tmp_path, image):
    with pytest.raises(UsageError, match="not an open-vocabulary detector"):
        create_detector("cvfm/tiny-sam")
    create_segmenter("cvfm/tiny-sam").save(tmp_path / "sam")
    with pytest.raises(UsageError, match="holds a sam model, not an open-vocabulary detector"):
        create_detector(str(tmp_path / "sam"))
    with pytest.raises(UsageError, match="non-empty text"):
        create_detector("cvfm/tiny-owlv2").detect(image, ["  "])
