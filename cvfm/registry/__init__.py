"""The model registry: one id namespace across sources, one door per model kind (`create_encoder`, ...).

Ids name their source:
  cvfm/<preset>     built-in tiny models for CPU runs (random init, seeded)
  timm/<arch>[.tag] any timm model; pretrained weights when asked and reachable
  hf/<repo-id>      a transformers vision backbone (DINOv2, ViT, ...) or image-text model (CLIP, SigLIP)
  open_clip/<arch>[:<tag>]        an open_clip model, with the weights of a pretrained tag
  open_clip/hf-hub:<org>/<repo>   an open_clip model from the Hugging Face hub
  open_clip/local-dir:<folder>    an open_clip folder (open_clip_config.json + safetensors weights)
  <folder>          a cvfm run folder, a timm export (config.json with "architecture"),
                    a transformers `save_pretrained` folder (config.json with "model_type"),
                    an open_clip folder (open_clip_config.json) or a paired encoder (paired.json)

Classifiers (`create_classifier`: a backbone and a class head, as `cvfm finetune` and `cvfm unlearn` write
them) are folders with classifier.json, or run folders holding one in classifier/; `create_encoder` on
them returns the classifier's backbone.

Image-text models (`create_dual_encoder`) are `cvfm/tiny-clip`, `hf/<clip-like repo>`, `open_clip/...`
and folders that hold one, among them a `PairedEncoder` (any image encoder + a dual's text half, as
`pretrain --method clip --text-model` writes it); `create_encoder` on them returns their image tower.

Promptable segmenters (`create_segmenter`: SAM, SAM-HQ, SAM 2) are `cvfm/tiny-sam`, `hf/<sam repo>`, the
transformers folders that hold one, and SAMs whose image encoder is a cvfm backbone (segmenter.json:
`cvfm.models.backbone_sam`, as `cvfm segment train --encoder` writes them in backbone/ and `cvfm distill
--loss sam-embedding` in segmenter/); `create_encoder` on those returns the backbone.

Open-vocabulary detectors (`create_detector`: OWL-ViT, OWLv2, Grounding DINO, each with its processor) are
`cvfm/tiny-owlv2`, `hf/<repo>` and the `save_pretrained` folders that hold one.

How it is built: `table.SOURCES` is the one table of sources (`source.Source`: how ids or folders are
recognised, a loader per model kind, the `cvfm models` rows); `create` holds the doors that read it; one
module per source family (`presets`, `timm_models`, `hf_models`, `open_clip_models`, `folders`) holds
the loaders.
"""

from cvfm.registry.create import (
    create_captioner,
    create_classifier,
    create_detector,
    create_dual_encoder,
    create_encoder,
    create_matcher,
    create_segmenter,
    list_models,
)
from cvfm.registry.presets import PRESETS

__all__ = [
    "PRESETS",
    "create_captioner",
    "create_classifier",
    "create_detector",
    "create_dual_encoder",
    "create_encoder",
    "create_matcher",
    "create_segmenter",
    "list_models",
]
