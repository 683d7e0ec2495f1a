"""A SAM whose image encoder is a cvfm backbone, MobileSAM's decoupled design (Zhang et al. 2023, "Faster
Segment Anything"): any image `Encoder` that gives patch tokens (a ViT) or a feature map (a CNN), and a neck
to SAM's image embedding, in place of SAM's ViT; SAM's prompt encoder and mask decoder (transformers'
SamModel) as they are. `cvfm distill --loss sam-embedding` trains the backbone and the neck's projection to
reproduce a SAM's embedding; `cvfm segment train --encoder` trains a fresh neck with the decoder.

The segmenter has SAM's face and preprocessing (`Segmenter`: the SAM's input size, its processor's resize and
padding). Its image encoder (`BackboneImageEncoder`) re-sizes and re-normalises that input to the backbone's
own preprocessing (as distillation feeds the student), and the neck maps the backbone's tokens linearly to
SAM's channels and resizes their grid bilinearly to SAM's embedding grid.

Folder layout (`save()`), loaded back by `create_segmenter(folder)` (its backbone by `create_encoder`):

    segmenter.json     {"format": "cvfm-backbone-sam", "version": 1, "sam", "backbone", "neck"}
    sam_config.json    the SamConfig (its vision part too: the positional encoding of prompts reads it)
    preprocess.json    SAM's preprocessing
    model.safetensors  neck.proj.*, and the SAM's shared_image_embedding.*, prompt_encoder.*, mask_decoder.*
    encoder/           the backbone's own save (loads alone through the registry)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cvfm.data.preprocess import Preprocess, adapt
from cvfm.errors import CvfmError, UsageError
from cvfm.models.encoder import PREPROCESS_FILE, Encoder, read_preprocess, resize_tokens, token_grid
from cvfm.models.segmenter import Segmenter

SEGMENTER_FILE = "segmenter.json"
FORMAT = "cvfm-backbone-sam"
VERSION = 1
SAM_CONFIG = "sam_config.json"
WEIGHTS = "model.safetensors"
ENCODER_DIR = "encoder"
SAM_PARTS = ("shared_image_embedding", "prompt_encoder", "mask_decoder")  # SamModel's, besides its ViT
WHY_NOT = {  # families whose decoder needs more of their own image encoder than one embedding
    "sam_hq": "SAM-HQ's mask decoder also reads its ViT's early features",
    "sam2": "SAM 2's mask decoder reads its encoder's pyramid of feature levels",
}


class Neck(nn.Module):
    """(B, h*w, D) backbone tokens on a grid (h, w) -> (B, C, H, W) SAM embedding: a linear map to SAM's
    channels, then the grid resized bilinearly to SAM's (the projection and resize that `cvfm distill --loss
    sam-embedding` trains)."""

    def __init__(self, proj: nn.Linear, grid: tuple[int, int]):
        super().__init__()
        self.proj, self.grid = proj, (int(grid[0]), int(grid[1]))

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = resize_tokens(self.proj(tokens), grid, self.grid)
        return x.transpose(1, 2).reshape(x.shape[0], -1, *self.grid)

    def spec(self) -> dict:
        return {"in_features": self.proj.in_features, "channels": self.proj.out_features, "grid": self.grid}


class BackboneImageEncoder(nn.Module):
    """In place of SamModel.vision_encoder: SAM's preprocessed pixels (B, 3, S, S) -> the backbone's input
    (its size and normalisation) -> its tokens -> the neck; returns (embedding,), as SAM's encoder output
    begins."""

    def __init__(self, backbone: Encoder, neck: Neck, preprocess: Preprocess):
        super().__init__()
        self.backbone, self.neck, self.preprocess = backbone, neck, preprocess

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor]:
        x = adapt(pixels, self.preprocess, self.backbone.preprocess)
        tokens = self.backbone.encode(x).patch_tokens
        return (self.neck(tokens, token_grid(self.backbone, tuple(x.shape[-2:]), tokens.shape[1])),)


class BackboneSegmenter(Segmenter):
    """A `Segmenter` whose SamModel's `vision_encoder` is a `BackboneImageEncoder`. `attach` builds one from a
    SAM and a backbone; `save` and `load` keep it (see the module's docstring)."""

    def __init__(
        self,
        sam: nn.Module,
        image_encoder: BackboneImageEncoder,
        name: str,
        preprocess: Preprocess,
        sam_name: str,
    ):
        check_family(sam, sam_name)
        with torch.device("meta"):  # every module but the replaced ViT comes from `sam`
            model = type(sam)(sam.config)
        for part in SAM_PARTS:
            setattr(model, part, getattr(sam, part))
        model.vision_encoder = image_encoder
        super().__init__(model.train(sam.training), name, preprocess)
        self.sam_name = sam_name

    @property
    def backbone(self) -> Encoder:
        return self.model.vision_encoder.backbone

    @classmethod
    def attach(
        cls, sam: Segmenter, backbone: Encoder, proj: nn.Linear | None = None, name: str | None = None
    ) -> BackboneSegmenter:
        """`sam` with `backbone` and a neck (`proj`, default a fresh linear map) as its image encoder."""
        check_family(sam.model, sam.name)
        check_feature_map(backbone)
        config = sam.model.config
        channels = config.vision_config.output_channels
        side = config.prompt_encoder_config.image_embedding_size
        proj = proj if proj is not None else nn.Linear(backbone.num_features, channels)
        if (proj.in_features, proj.out_features) != (backbone.num_features, channels):
            raise CvfmError(
                f"the neck maps {proj.in_features} to {proj.out_features} channels; the backbone gives "
                f"{backbone.num_features} and {sam.name} takes {channels}"
            )
        image_encoder = BackboneImageEncoder(backbone, Neck(proj, (side, side)), sam.preprocess)
        return cls(sam.model, image_encoder, name or f"{sam.name}+{backbone.name}", sam.preprocess, sam.name)

    def freeze_image_encoder(self) -> None:
        """The backbone only: the neck keeps training (a fresh one must)."""
        self.backbone.eval().requires_grad_(False)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        image_encoder: BackboneImageEncoder = self.model.vision_encoder
        image_encoder.backbone.save(folder / ENCODER_DIR)
        state, seen = {}, set()
        for key, value in self.model.state_dict(keep_vars=True).items():
            if key.startswith("vision_encoder.neck."):
                key = key.removeprefix("vision_encoder.")
            elif key.startswith("vision_encoder.") or id(value) in seen:  # the backbone; a tied weight
                continue
            seen.add(id(value))
            state[key] = value.detach().contiguous().cpu()
        save_file(state, folder / WEIGHTS, metadata={"format": "pt"})
        (folder / SAM_CONFIG).write_text(self.model.config.to_json_string())
        (folder / PREPROCESS_FILE).write_text(json.dumps(asdict(self.preprocess), indent=2) + "\n")
        spec = {"sam": self.sam_name, "backbone": self.backbone.name, "neck": image_encoder.neck.spec()}
        (folder / SEGMENTER_FILE).write_text(
            json.dumps({"format": FORMAT, "version": VERSION, **spec}, indent=2) + "\n"
        )
        return folder

    @classmethod
    def load(cls, folder: Path, name: str, load_encoder: Callable[[Path], Encoder]) -> BackboneSegmenter:
        """`save()`'s folder; every weight must match its place."""
        from transformers import SamConfig, SamModel

        try:
            spec = json.loads((folder / SEGMENTER_FILE).read_text())
            config = SamConfig.from_json_file(folder / SAM_CONFIG)
            weights = load_file(folder / WEIGHTS)
        except (OSError, ValueError) as e:
            raise CvfmError(f"cannot read the segmenter '{name}': {e}") from None
        if spec.get("format") != FORMAT:
            raise CvfmError(f"'{folder / SEGMENTER_FILE}' is not a {FORMAT} file")
        preprocess = read_preprocess(folder)
        if preprocess is None:
            raise CvfmError(f"the segmenter '{name}' has no {PREPROCESS_FILE}")
        n = spec["neck"]
        neck = Neck(nn.Linear(n["in_features"], n["channels"]), n["grid"])
        neck_weights = {k.removeprefix("neck."): v for k, v in weights.items() if k.startswith("neck.")}
        with torch.device("meta"):
            sam = SamModel(config)
        sam_weights = {k: v for k, v in weights.items() if not k.startswith("neck.")}
        try:
            neck.load_state_dict(neck_weights, strict=True)
            found = sam.load_state_dict(sam_weights, strict=False, assign=True)
        except RuntimeError as e:
            raise CvfmError(f"weights of '{name}' do not match its architecture: {e}") from None
        sam.tie_weights()
        missing = [k for k in found.missing_keys if not k.startswith("vision_encoder.")]
        meta = [k for p in SAM_PARTS for k, t in getattr(sam, p).state_dict().items() if t.is_meta]
        if found.unexpected_keys or meta:
            detail = ", ".join((found.unexpected_keys + missing)[:5])
            raise CvfmError(f"weights of '{name}' do not match its architecture ({detail})")
        image_encoder = BackboneImageEncoder(load_encoder(folder / ENCODER_DIR), neck, preprocess)
        return cls(sam.eval(), image_encoder, name, preprocess, spec.get("sam", "")).eval()


def is_backbone_segmenter_folder(folder: Path) -> bool:
    return (folder / SEGMENTER_FILE).is_file()


def check_family(sam: nn.Module, name: str) -> None:
    """A backbone replaces the ViT of a SAM (model_type "sam") only: other decoders need more of theirs."""
    family = getattr(sam.config, "model_type", None)
    if family != "sam":
        why = WHY_NOT.get(family, f"'{name}' is not a SAM")
        raise UsageError(f"a cvfm backbone replaces the image encoder of a SAM; '{name}' is {family}: {why}")


@torch.no_grad()
def check_feature_map(backbone: Encoder) -> None:
    """Refuse a backbone that gives a pooled embedding only (no patch tokens, no feature map): one black
    image of its input size through it, in eval mode (no statistics move)."""
    was_training = backbone.training
    device = next(iter(backbone.parameters()), torch.empty(0)).device
    size = backbone.preprocess.size
    try:
        tokens = backbone.eval().encode(torch.zeros(1, 3, size, size, device=device)).patch_tokens
    finally:
        backbone.train(was_training)
    if tokens is None:
        raise UsageError(
            f"'{backbone.name}' gives a pooled embedding only: a SAM image encoder needs patch tokens or a "
            "feature map (a ViT or a CNN)"
        )
