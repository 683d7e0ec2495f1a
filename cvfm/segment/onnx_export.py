"""ONNX export of both halves of a SAM: the image encoder, and the prompt encoder + mask decoder with any
number of points (segment-anything exports only the decoder).

Files written to the output folder:
  encoder.onnx         pixel_values (B, 3, S, S) -> image_embeddings (B, C, h, w)
  decoder.onnx         the prompt encoder and mask decoder, 3 masks per prompt (multimask)
  decoder_single.onnx  the same with SAM's single-mask output (for refinement clicks)
  sam_onnx.json        input size, preprocessing and the decoders' input convention

The decoders take SAM's ONNX convention: `image_embeddings` (1, C, h, w); `point_coords` (1, N, 2) x, y
in the model's input frame (the original scaled by `Segmenter.to_input`), a box as two corner points;
`point_labels` (1, N): 1 foreground, 0 background, 2 and 3 a box's top-left and bottom-right corners,
-1 padding (add one padding point when there is no box, as SamPredictor and transformers do);
`mask_input` (1, 1, 4h, 4w) low-res logits and `has_mask_input` (1,) 1.0 or 0.0. Outputs: `low_res_masks`
(1, M, 4h, 4w) logits and `iou_predictions` (1, M). `onnx_prompts` builds these inputs from cvfm prompts.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from cvfm.errors import CvfmError
from cvfm.models.segmenter import Segmenter

OPSET = 18


class _Encoder(nn.Module):
    def __init__(self, segmenter: Segmenter):
        super().__init__()
        self.vision = segmenter.model.vision_encoder

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vision(pixel_values)[0]


class _Decoder(nn.Module):
    """SamModel's prompt encoder and mask decoder with every prompt as labelled points (SAM's ONNX form)."""

    def __init__(self, segmenter: Segmenter, multimask: bool):
        super().__init__()
        model = segmenter.model
        self.prompt, self.decoder, self.multimask = model.prompt_encoder, model.mask_decoder, multimask
        self.register_buffer("positional", model.get_image_wide_positional_embeddings())

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        prompt = self.prompt
        points = (point_coords + 0.5)[:, None]  # (1, 1, N, 2): one prompt of N points
        labels = point_labels[:, None]
        size = (prompt.input_image_size, prompt.input_image_size)
        sparse = prompt.shared_embedding(points, size)
        sparse = torch.where(labels[..., None] == -1, prompt.not_a_point_embed.weight, sparse)
        for k in range(4):  # 0 / 1: background / foreground point; 2 / 3: box corners
            sparse = torch.where((labels == k)[..., None], sparse + prompt.point_embed[k].weight, sparse)
        no_mask = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1)
        has = has_mask_input.reshape(-1, 1, 1, 1)
        dense = has * prompt.mask_embed(mask_input) + (1 - has) * no_mask
        masks, iou = self.decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=self.positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.multimask,
        )[:2]
        return masks[:, 0], iou[:, 0]


def onnx_prompts(
    segmenter: Segmenter,
    original: tuple[int, int],
    points: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    box: torch.Tensor | None = None,
    mask_input: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """The decoders' inputs (but `image_embeddings`) for one prompt: `points` (N, 2) x, y of the original
    image with `labels` (N,), `box` (4,), `mask_input` (1, h, w)."""
    coords, marks, has_mask = [], [], mask_input is not None
    if points is not None:
        coords.append(segmenter.to_input(points.reshape(-1, 2), original))
        marks.append(torch.ones(len(coords[-1])) if labels is None else labels.reshape(-1).double())
    if box is None:
        coords.append(torch.zeros(1, 2, dtype=torch.float64))
        marks.append(torch.tensor([-1.0]))
    else:
        coords.append(segmenter.to_input(box.reshape(2, 2), original))
        marks.append(torch.tensor([2.0, 3.0]))
    side = 4 * segmenter.model.config.prompt_encoder_config.image_embedding_size
    if mask_input is None:
        mask_input = torch.zeros(1, 1, side, side)
    return {
        "point_coords": torch.cat(coords)[None].float(),
        "point_labels": torch.cat(marks)[None].float(),
        "mask_input": mask_input.reshape(1, 1, side, side).float(),
        "has_mask_input": torch.tensor([float(has_mask)]),
    }


def export_onnx(segmenter: Segmenter, folder: str | Path, overwrite: bool = False) -> Path:
    """Write the encoder and both decoders of `segmenter` to `folder` (see the module docstring)."""
    if segmenter.family != "sam":
        raise CvfmError(f"ONNX export covers SAM models; '{segmenter.name}' is {segmenter.family}")
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise CvfmError(f"'{folder}' exists and is not empty: use --overwrite or another -o")
    folder.mkdir(parents=True, exist_ok=True)
    segmenter = segmenter.eval().float()
    size = segmenter.input_size
    pixels = torch.zeros(2, 3, size, size)  # batch 2: an example batch of 1 would fix the batch size
    with torch.no_grad():
        embeddings = segmenter.model.vision_encoder(pixels[:1])[0]
    batch = torch.export.Dim("batch", min=1)
    _export(_Encoder(segmenter), (pixels,), folder / "encoder.onnx", {"pixel_values": {0: batch}})
    example = onnx_prompts(segmenter, (size, size), points=torch.tensor([[10.0, 10.0], [20.0, 5.0]]))
    points = torch.export.Dim("points", min=1)
    shapes = {
        "image_embeddings": None,
        "point_coords": {1: points},
        "point_labels": {1: points},
        "mask_input": None,
        "has_mask_input": None,
    }
    for multimask, name in ((True, "decoder.onnx"), (False, "decoder_single.onnx")):
        _export(_Decoder(segmenter, multimask), (embeddings, *example.values()), folder / name, shapes)
    record = {
        "model": segmenter.name,
        "input_size": size,
        "preprocess": asdict(segmenter.preprocess),
        "decoder_inputs": [
            "image_embeddings",
            "point_coords",
            "point_labels",
            "mask_input",
            "has_mask_input",
        ],
        "decoder_outputs": ["low_res_masks", "iou_predictions"],
        "opset": OPSET,
    }
    (folder / "sam_onnx.json").write_text(json.dumps(record, indent=2) + "\n")
    return folder


def _export(module: nn.Module, args: tuple, path: Path, dynamic_shapes: dict) -> None:
    names = list(dynamic_shapes)
    outputs = ["image_embeddings"] if len(names) == 1 else ["low_res_masks", "iou_predictions"]
    with torch.no_grad():
        program = torch.onnx.export(
            module.eval(),
            args,
            input_names=names,
            output_names=outputs,
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    tmp = path.with_name(path.name + ".tmp")
    program.save(str(tmp))
    tmp.replace(path)
