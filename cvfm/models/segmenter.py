"""One face for promptable segmenters (SAM, SAM-HQ and SAM 2 through transformers): embed each image once,
then decode any number of prompts against its embedding, as segment-anything's `SamPredictor` does.

Prompts are in pixels of the original image, (x, y), like the predictor's. The face maps them into the
model's input frame exactly as the model's own processor does, and maps the predicted masks back as its
`post_process_masks` does:
  SAM, SAM-HQ  (SamProcessor) the longest side resized to the input size, the short side rounded half up,
               the rest padded; masks: the low-resolution logits upsampled to the padded input, the
               padding cropped, then resized to the original size
  SAM 2        (Sam2Processor) the image squashed to the square input; masks: the low-resolution logits
               resized to the original size
(resizes bilinear, corners not aligned). SAM 2's embedding is its list of feature levels.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from cvfm.data.preprocess import Preprocess
from cvfm.errors import CvfmError
from cvfm.models.encoder import PREPROCESS_FILE

FAMILIES = {"sam": "longest", "sam_hq": "longest", "sam2": "squash"}  # model_type: its processor's resize


@dataclass
class ImageEmbedding:
    """The encoder's output for a batch of images, with each image's original and resized (H, W)."""

    features: torch.Tensor | list[torch.Tensor]  # (B, C, h, w); SAM 2: one per feature level
    original_sizes: list[tuple[int, int]]
    input_sizes: list[tuple[int, int]]
    intermediate: list[torch.Tensor] | None = None  # SAM-HQ: the encoder's early features

    def __len__(self) -> int:
        return len(self.original_sizes)

    def to(self, device: torch.device | str) -> ImageEmbedding:
        move = lambda ts: None if ts is None else [t.to(device) for t in ts]  # noqa: E731
        features = move(self.features) if isinstance(self.features, list) else self.features.to(device)
        return ImageEmbedding(features, self.original_sizes, self.input_sizes, move(self.intermediate))

    @property
    def device(self) -> torch.device:
        return (self.features[0] if isinstance(self.features, list) else self.features).device

    def rows(self, index: torch.Tensor | list[int]) -> ImageEmbedding:
        """The images at `index`, repeats allowed (one row per prompt, as `Segmenter.decode_batch` takes)."""
        index = torch.as_tensor(index, dtype=torch.long)
        pick = lambda ts: None if ts is None else [t[index.to(t.device)] for t in ts]  # noqa: E731
        features = pick(self.features) if isinstance(self.features, list) else pick([self.features])[0]
        sizes = lambda ss: [ss[k] for k in index.tolist()]  # noqa: E731
        return ImageEmbedding(
            features, sizes(self.original_sizes), sizes(self.input_sizes), pick(self.intermediate)
        )

    def select(self, i: int) -> ImageEmbedding:
        """Image i alone."""
        return self.rows([i])


@dataclass
class MaskPrediction:
    """Masks for P prompts of one image, M candidates each (3 with multimask, else 1)."""

    low_res_logits: torch.Tensor  # (P, M, h, w): logits at the decoder's resolution (input size / 4)
    iou: torch.Tensor  # (P, M): the predicted IoU of each candidate


class Segmenter(nn.Module):
    """A SAM-family model: `embed_image(pixels, sizes)`, then `decode(embedding, ...)` per image, and
    `upscale(...)` to masks of the original image."""

    def __init__(self, model: nn.Module, name: str, preprocess: Preprocess):
        super().__init__()
        family = getattr(model.config, "model_type", None)
        if family not in FAMILIES:
            raise CvfmError(f"'{name}' is a {type(model).__name__}, not a SAM, SAM-HQ or SAM 2 model")
        self.model, self.name, self.family, self.preprocess = model, name, family, preprocess
        if preprocess.resize_mode != FAMILIES[family]:
            raise CvfmError(
                f"'{name}' ({family}) must be preprocessed with resize_mode '{FAMILIES[family]}', not "
                f"'{preprocess.resize_mode}'"
            )

    @property
    def input_size(self) -> int:
        return self.preprocess.size

    def input_shape(self, original: tuple[int, int]) -> tuple[int, int]:
        """The (H, W) of an original (H, W) image resized for the model, before padding (as SamProcessor)."""
        if self.family == "sam2":
            return self.input_size, self.input_size
        h, w = original
        scale = self.input_size / max(h, w)
        return int(h * scale + 0.5), int(w * scale + 0.5)

    def embed_image(self, pixels: torch.Tensor, original_sizes: list[tuple[int, int]]) -> ImageEmbedding:
        """Embed preprocessed images (B, 3, S, S) whose originals were `original_sizes` (H, W)."""
        if pixels.shape[0] != len(original_sizes):
            raise CvfmError(f"{pixels.shape[0]} images but {len(original_sizes)} original sizes")
        sizes = [tuple(map(int, s)) for s in original_sizes]
        inputs = [self.input_shape(s) for s in sizes]
        if self.family == "sam2":  # transformers wraps it in no_grad: call the function itself (training)
            levels = type(self.model).get_image_embeddings.__wrapped__(self.model, pixels)
            return ImageEmbedding(list(levels), sizes, inputs)
        out = self.model.vision_encoder(pixels)
        inter = list(out[1]) if self.family == "sam_hq" else None
        return ImageEmbedding(out[0], sizes, inputs, inter)

    def to_input(self, xy: torch.Tensor, original: tuple[int, int]) -> torch.Tensor:
        """(..., 2) x, y pixels of the original image in the model's input frame."""
        (old_h, old_w), (new_h, new_w) = original, self.input_shape(original)
        scale = torch.tensor([new_w / old_w, new_h / old_h], dtype=torch.float64)
        return xy.to(torch.float64) * scale  # float64 like SamProcessor's; the model casts after normalising

    def decode(
        self,
        embedding: ImageEmbedding,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = True,
    ) -> MaskPrediction:
        """Masks for P prompts of the one image of `embedding`.

        `points` (P, N, 2) x, y in original pixels with `labels` (P, N) (1 foreground, 0 background,
        -1 padding; all 1 when omitted); `boxes` (P, 4) x0, y0, x1, y1; `mask_input` (1, h, w) low-res
        logits of an earlier prediction (one prompt). Any combination, at least one."""
        if len(embedding) != 1:
            raise CvfmError("decode takes the embedding of one image: use embedding.select(i)")
        if points is None and boxes is None and mask_input is None:
            raise CvfmError("give at least one prompt: points, boxes or a mask")
        original, device = embedding.original_sizes[0], embedding.device
        kwargs = {"image_embeddings": embedding.features, "multimask_output": multimask}
        if points is not None:
            if labels is None:
                labels = torch.ones(points.shape[:2], dtype=torch.long)
            if points.ndim != 3 or labels.shape != points.shape[:2]:
                raise CvfmError(f"points must be (P, N, 2) with labels (P, N), not {tuple(points.shape)}")
            kwargs["input_points"] = self.to_input(points, original)[None].to(device)
            kwargs["input_labels"] = labels[None].long().to(device)
        if boxes is not None:
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise CvfmError(f"boxes must be (P, 4), not {tuple(boxes.shape)}")
            corners = self.to_input(boxes.reshape(-1, 2, 2), original)
            kwargs["input_boxes"] = corners.reshape(-1, 4)[None].to(device)
        if mask_input is not None:
            kwargs["input_masks"] = mask_input.reshape(1, 1, *mask_input.shape[-2:]).to(device)
        if embedding.intermediate is not None:
            kwargs["intermediate_embeddings"] = embedding.intermediate
        out = self.model(**kwargs)
        return MaskPrediction(low_res_logits=out.pred_masks[0], iou=out.iou_scores[0])

    def decode_batch(
        self,
        features: torch.Tensor | list[torch.Tensor],
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask: bool = True,
        intermediate: list[torch.Tensor] | None = None,
    ) -> MaskPrediction:
        """Masks for P prompts that each bring their own image embedding (rows of `embed_image`'s features,
        so one call serves the prompts of several images) and may each bring their own mask: the prompts go
        on the model's batch axis. Training decodes this way.

        `features` (P, C, h, w) (SAM 2: P rows of each feature level, `ImageEmbedding.rows`); `points`
        (P, N, 2) x, y with `labels` (P, N) and `boxes` (P, 4) x0, y0, x1, y1 in pixels of the model's
        input frame (the resized image, before padding); `mask_input` (P, h', w') low-res logits;
        `intermediate` SAM-HQ's early features, P rows each."""
        kwargs = {"image_embeddings": features, "multimask_output": multimask}
        if points is not None:
            kwargs["input_points"] = points[:, None]
            kwargs["input_labels"] = labels[:, None].long()
        if boxes is not None:
            kwargs["input_boxes"] = boxes[:, None]
        if mask_input is not None:
            kwargs["input_masks"] = mask_input[:, None]
        if intermediate is not None:
            kwargs["intermediate_embeddings"] = intermediate
        out = self.model(**kwargs)
        return MaskPrediction(low_res_logits=out.pred_masks[:, 0], iou=out.iou_scores[:, 0])

    def input_logits(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """(..., h, w) low-res logits upsampled to the padded input frame (..., S, S), as `upscale` begins."""
        size, lead = (self.input_size, self.input_size), low_res_logits.shape[:-2]
        x = low_res_logits.float().reshape(-1, 1, *low_res_logits.shape[-2:])
        return F.interpolate(x, size, mode="bilinear", align_corners=False).reshape(*lead, *size)

    def input_masks(self, masks: torch.Tensor, original: tuple[int, int]) -> torch.Tensor:
        """(P, H, W) boolean masks of an original (H, W) image in the model's input frame, (P, S, S) bool: as
        the image goes in, resized (the longest side to S, the preprocessing's interpolation, antialiased),
        then padded at the bottom and right; a pixel is in the mask when at least half covered."""
        new_h, new_w = self.input_shape(original)
        mode = InterpolationMode(self.preprocess.interpolation)
        x = TF.resize(masks.float(), [new_h, new_w], interpolation=mode, antialias=True) >= 0.5
        return F.pad(x, (0, self.input_size - new_w, 0, self.input_size - new_h))

    def upscale(self, low_res_logits: torch.Tensor, embedding: ImageEmbedding) -> torch.Tensor:
        """(P, M, h, w) low-res logits of the one image of `embedding` as (P, M, H, W) logits of its
        original size (threshold at 0 for the masks)."""
        (new_h, new_w), original = embedding.input_sizes[0], embedding.original_sizes[0]
        if self.family == "sam2":
            return F.interpolate(low_res_logits.float(), original, mode="bilinear", align_corners=False)
        x = self.input_logits(low_res_logits)[..., :new_h, :new_w]
        return F.interpolate(x, original, mode="bilinear", align_corners=False)

    def freeze_image_encoder(self) -> None:
        """What `cvfm segment train` keeps fixed unless --train-encoder: the image encoder."""
        self.model.vision_encoder.eval().requires_grad_(False)

    def save(self, folder: str | Path) -> Path:
        """transformers' layout (safetensors), loadable by `create_segmenter(folder)`."""
        folder = Path(folder)
        self.model.save_pretrained(folder, safe_serialization=True)
        (folder / PREPROCESS_FILE).write_text(json.dumps(asdict(self.preprocess), indent=2) + "\n")
        return folder
