"""Uniform faces over model sources (timm, transformers, cvfm presets)."""

from cvfm.models.encoder import Encoder, EncoderOutput

__all__ = ["Encoder", "EncoderOutput"]
