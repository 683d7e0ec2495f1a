"""The registry's one table: every model source, in the order ids and folders are matched.

A row says how its ids (a prefix, or one preset id) or its folders are recognised, which loader builds each
model kind from it, and what `cvfm models` lists of it. Every `create_*` door and `cvfm models` read this
table: a new source is a new row; a new model kind is a key in the rows that give it, and a door in
`cvfm.registry.create`.
"""

from __future__ import annotations

from cvfm.models.backbone_sam import ENCODER_DIR, is_backbone_segmenter_folder
from cvfm.models.classifier import is_classifier_folder
from cvfm.models.paired import is_paired_folder
from cvfm.registry import hf_models, open_clip_models, presets, timm_models
from cvfm.registry.folders import load_backbone_segmenter, load_classifier_folder, load_paired
from cvfm.registry.source import (
    CAPTIONER,
    CLASSIFIER,
    DETECTOR,
    IMAGE,
    IMAGE_TEXT,
    MATCHER,
    SEGMENTER,
    Source,
    image_tower,
    inside,
)

_HF = {
    IMAGE: hf_models.load_encoder,
    IMAGE_TEXT: hf_models.load_dual,
    CAPTIONER: hf_models.load_captioner,
    MATCHER: hf_models.load_matcher,
    SEGMENTER: hf_models.load_segmenter,
    DETECTOR: hf_models.load_detector,
}
_OPEN_CLIP_ID = {IMAGE_TEXT: open_clip_models.load_id, IMAGE: image_tower(open_clip_models.load_id)}
_OPEN_CLIP_FOLDER = {
    IMAGE_TEXT: open_clip_models.load_folder,
    IMAGE: image_tower(open_clip_models.load_folder),
}
_PAIRED = {IMAGE_TEXT: load_paired, IMAGE: image_tower(load_paired)}


SOURCES: tuple[Source, ...] = (
    *presets.SOURCES,  # cvfm/<preset>
    Source(
        "timm",
        "timm/<arch>",
        {IMAGE: timm_models.load_arch},
        prefix="timm/",
        overrides=True,
        listing=timm_models.rows,
    ),
    Source("hf", "hf/<repo-id>", _HF, prefix="hf/"),
    Source(
        "open_clip",
        "open_clip/<arch>:<tag>",
        _OPEN_CLIP_ID,
        prefix=open_clip_models.PREFIX,
        listing=open_clip_models.rows,
    ),
    # Folders. A run folder's model is in its classifier/ or backbone/ sub-folder.
    Source(
        "folder",
        "a folder with classifier.json",
        {CLASSIFIER: load_classifier_folder, IMAGE: inside("backbone")},
        holds=is_classifier_folder,
    ),
    Source(
        "folder",
        "a run folder with classifier/ (written by cvfm finetune or cvfm unlearn)",
        {CLASSIFIER: inside("classifier"), IMAGE: inside("classifier")},
        holds=lambda folder: is_classifier_folder(folder / "classifier"),
    ),
    Source(
        "folder",
        "a SAM with a cvfm backbone (segmenter.json)",
        {SEGMENTER: load_backbone_segmenter, IMAGE: inside(ENCODER_DIR)},
        holds=is_backbone_segmenter_folder,
    ),
    Source(
        "folder",
        "a run folder with segmenter/ (written by cvfm distill --loss sam-embedding)",
        {SEGMENTER: inside("segmenter"), IMAGE: inside("backbone")},
        holds=lambda folder: is_backbone_segmenter_folder(folder / "segmenter"),
    ),
    Source(
        "folder",
        "a run folder with backbone/ (written by cvfm pretrain)",
        {kind: inside("backbone") for kind in (IMAGE, IMAGE_TEXT, CAPTIONER, MATCHER, SEGMENTER)},
        holds=lambda folder: (folder / "backbone").is_dir(),
    ),
    Source("folder", "a paired encoder (paired.json)", _PAIRED, holds=is_paired_folder),
    Source(
        "folder",
        'a timm export (config.json with "architecture")',
        {IMAGE: timm_models.load_export},
        holds=timm_models.is_export,
    ),
    Source("folder", 'a transformers folder (config.json with "model_type")', _HF, holds=hf_models.is_folder),
    Source(
        "folder",
        "an open_clip folder (open_clip_config.json)",
        _OPEN_CLIP_FOLDER,
        holds=open_clip_models.is_folder,
    ),
    Source(
        "folder",
        "a folder whose config.json is neither a timm nor a transformers model",
        {},
        holds=lambda folder: (folder / "config.json").exists(),
    ),
)
