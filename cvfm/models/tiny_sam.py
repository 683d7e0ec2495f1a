"""`cvfm/tiny-sam`: a seeded random SAM (transformers' SamModel) small enough to train on a CPU in minutes:
128 px input, a 2-layer ViT encoder (patch 8, width 48) giving a 16x16 embedding, 64x64 low-res masks."""

from __future__ import annotations

import torch

from cvfm.data.preprocess import Preprocess

SIZE = 128
# Weights ~ N(0, 0.15^2), about 1/sqrt(width): transformers' defaults (1e-10 in the encoder, 0.02 elsewhere)
# leave a random model's mask logits ~1e-5, too flat to train from or to compare outputs on.
INIT = 0.15
# SamProcessor's preprocessing at 128 px: longest side to 128 (bilinear), ImageNet normalisation, zero
# padding at the bottom and right.
PREPROCESS = Preprocess(
    size=SIZE,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    interpolation="bilinear",
    resize_mode="longest",
    library="transformers",
)


def tiny_sam_config():
    from transformers import SamConfig

    patch = 8
    config = SamConfig(
        vision_config={
            "hidden_size": 48,
            "output_channels": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": SIZE,
            "patch_size": patch,
            "window_size": 4,
            "global_attn_indexes": [1],
            "num_pos_feats": 16,
            "mlp_ratio": 2.0,
            "initializer_range": INIT,
        },
        prompt_encoder_config={
            "hidden_size": 32,
            "image_size": SIZE,
            "patch_size": patch,
            "mask_input_channels": 8,
        },
        initializer_range=INIT,
        mask_decoder_config={
            "hidden_size": 32,
            "mlp_dim": 64,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
    )
    # The random Fourier features that place prompts and image tokens: segment-anything draws them
    # N(0, 1) (PositionEmbeddingRandom's scale 1.0); transformers' SamVisionConfig sets the scale to
    # hidden_size // 2 (24 here), frequencies so high that nearby positions look unrelated and a random
    # model cannot learn where a prompt is. Real checkpoints bring their own, so this matters for
    # random models only.
    config.vision_config.scale = 1.0
    return config


def build_tiny_sam(seed: int = 0):
    """The SamModel, its weights a function of `seed` only (the global RNG is left alone)."""
    from transformers import SamModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SamModel(tiny_sam_config()).eval()


# `cvfm/tiny-sam2`: SAM 2 (Hiera backbone, 3 feature levels) at 128 px, squashed like Sam2Processor does.
PREPROCESS_SAM2 = Preprocess(
    size=SIZE,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
    interpolation="bilinear",
    resize_mode="squash",
    library="transformers",
)


def tiny_sam2_config():
    from transformers import Sam2Config

    hiera = {
        "model_type": "sam2_hiera_det_model",
        "image_size": [SIZE, SIZE],
        "hidden_size": 16,
        "blocks_per_stage": [1, 2, 2, 1],
        "embed_dim_per_stage": [16, 32, 64, 128],
        "num_attention_heads_per_stage": [1, 1, 2, 2],
        "window_size_per_stage": [4, 4, 4, 4],
        "global_attention_blocks": [4],  # not a stage's first block: those pool queries in windows
        "window_positional_embedding_background_size": [2, 2],
        "initializer_range": INIT,
    }
    return Sam2Config(
        vision_config={
            "backbone_config": hiera,
            "backbone_channel_list": [128, 64, 32, 16],
            "backbone_feature_sizes": [[32, 32], [16, 16], [8, 8]],
            "fpn_hidden_size": 32,
            "initializer_range": INIT,
        },
        prompt_encoder_config={
            "hidden_size": 32,
            "image_size": SIZE,
            "patch_size": 16,
            "mask_input_channels": 8,
        },
        mask_decoder_config={
            "hidden_size": 32,
            "mlp_dim": 64,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
        initializer_range=INIT,
    )


def build_tiny_sam2(seed: int = 0):
    """The Sam2Model, its weights a function of `seed` only."""
    from transformers import Sam2Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Sam2Model(tiny_sam2_config()).eval()
