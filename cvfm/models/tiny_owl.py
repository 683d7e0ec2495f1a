"""`cvfm/tiny-owlv2`: a seeded random OWLv2 (transformers' Owlv2ForObjectDetection) with its processor, built
offline, for CPU runs of `cvfm segment text --strategy detector`: 64 px input (patch 8: 64 boxes), one-layer
towers 32 wide, and `cvfm/tiny-clip`'s CLIP tokenizer (16 tokens, OWL's text length)."""

from __future__ import annotations

import torch

from cvfm.models.tiny_clip import build_tokenizer, text_ids

SIZE, PATCH, CONTEXT = 64, 8, 16


def build_tiny_owlv2(seed: int = 0):
    """(Owlv2ForObjectDetection, Owlv2Processor), the weights a function of `seed` only (the global RNG is
    left alone)."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    tokenizer = build_tokenizer(CONTEXT)
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = Owlv2Config(
        text_config={**tower, **text_ids(tokenizer, CONTEXT)},
        vision_config={**tower, "image_size": SIZE, "patch_size": PATCH},
        projection_dim=32,
        # transformers' default (1.0) saturates a random model's box head: boxes of zero width, scores
        # near 0 or 1. At 0.1 its boxes stay near OWL's per-patch priors (~10 px) and scores spread 0.4-0.7.
        initializer_factor=0.1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Owlv2ForObjectDetection(config).eval()
    image_processor = Owlv2ImageProcessor(size={"height": SIZE, "width": SIZE})
    return model, Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)
