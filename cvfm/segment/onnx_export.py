"""ONNX export of both halves of a SAM, SAM-HQ or SAM 2: the image encoder, and the prompt encoder + mask
decoder with any number of points (segment-anything and SAM-HQ export only the decoder).

Files written to the output folder:
  encoder.onnx         pixel_values (B, 3, S, S) -> image_embeddings (B, C, h, w), and the features the
                       decoder also reads: SAM-HQ `intermediate_embeddings` (B, h, w, C') (the first
                       global-attention block's output), SAM 2 `high_res_features_0` (B, C/8, 4h, 4w) and
                       `high_res_features_1` (B, C/4, 2h, 2w)
  decoder.onnx         the prompt encoder and mask decoder, 3 masks per prompt (multimask)
  decoder_single.onnx  the same with the single-mask output (for refinement clicks; SAM 2 falls back to the
                       best of its 3 masks when the single one is unstable, as its model does)
  sam_onnx.json        family, input size, preprocessing and the decoders' inputs and outputs

The decoders take SAM's ONNX convention: `image_embeddings` (1, C, h, w) (and the family's extra
features, one image); `point_coords` (1, N, 2) x, y in the model's input frame (the original scaled by
`Segmenter.to_input`), a box as two corner points; `point_labels` (1, N): 1 foreground, 0 background, 2 and
3 a box's top-left and bottom-right corners, -1 padding (SAM, SAM-HQ: one padding point when there is no
box, as SamPredictor and transformers do; SAM 2: one padding point always, as its prompt encoder adds);
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


# What each family's encoder gives the decoder besides image_embeddings (the families `Segmenter` admits).
EXTRA_FEATURES = {
    "sam": [],
    "sam_hq": ["intermediate_embeddings"],
    "sam2": ["high_res_features_0", "high_res_features_1"],
}


class _Encoder(nn.Module):
    def __init__(self, segmenter: Segmenter):
        super().__init__()
        self.segmenter = segmenter

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return _features(self.segmenter, pixel_values)


def _features(segmenter: Segmenter, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """image_embeddings, then the family's EXTRA_FEATURES, as `Segmenter.embed_image` computes them."""
    if segmenter.family == "sam2":
        *high, last = segmenter.model.get_image_embeddings(pixels)
        return (last, *high)
    out = segmenter.model.vision_encoder(pixels)
    return (out[0], out[1][0]) if segmenter.family == "sam_hq" else (out[0],)


class _Decoder(nn.Module):
    """The prompt encoder and mask decoder with every prompt as labelled points (SAM's ONNX form)."""

    def __init__(self, segmenter: Segmenter, multimask: bool):
        super().__init__()
        model = segmenter.model
        self.family, self.multimask = segmenter.family, multimask
        self.prompt, self.decoder = model.prompt_encoder, model.mask_decoder
        self.register_buffer("positional", model.get_image_wide_positional_embeddings())

    def label_embedding(self, k: int) -> torch.Tensor:
        """The embedding added to a point of label k (0 background, 1 foreground, 2 / 3 box corners)."""
        embed = self.prompt.point_embed
        return embed.weight[k] if self.family == "sam2" else embed[k].weight

    def forward(self, image_embeddings, point_coords, point_labels, mask_input, has_mask_input):
        return self.decode(image_embeddings, [], point_coords, point_labels, mask_input, has_mask_input)

    def decode(self, image_embeddings, features, point_coords, point_labels, mask_input, has_mask_input):
        prompt = self.prompt
        points = (point_coords + 0.5)[:, None]  # (1, 1, N, 2): one prompt of N points
        labels = point_labels[:, None]
        size = (prompt.input_image_size, prompt.input_image_size)
        sparse = prompt.shared_embedding(points, size)
        sparse = torch.where(labels[..., None] == -1, prompt.not_a_point_embed.weight, sparse)
        for k in range(4):
            sparse = torch.where((labels == k)[..., None], sparse + self.label_embedding(k), sparse)
        no_mask = prompt.no_mask_embed.weight.reshape(1, -1, 1, 1)
        has = has_mask_input.reshape(-1, 1, 1, 1)
        dense = has * prompt.mask_embed(mask_input) + (1 - has) * no_mask
        kwargs = {}
        if self.family == "sam_hq":
            kwargs = {"hq_token_only": False, "intermediate_embeddings": features}
        elif self.family == "sam2":
            kwargs = {"high_resolution_features": features}
        masks, iou = self.decoder(
            image_embeddings=image_embeddings,
            image_positional_embeddings=self.positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=self.multimask,
            **kwargs,
        )[:2]
        return masks[:, 0], iou[:, 0]


class _DecoderHQ(_Decoder):
    def forward(
        self,
        image_embeddings,
        intermediate_embeddings,
        point_coords,
        point_labels,
        mask_input,
        has_mask_input,
    ):
        features = [intermediate_embeddings]
        return self.decode(image_embeddings, features, point_coords, point_labels, mask_input, has_mask_input)


class _Decoder2(_Decoder):
    def forward(
        self,
        image_embeddings,
        high_res_features_0,
        high_res_features_1,
        point_coords,
        point_labels,
        mask_input,
        has_mask_input,
    ):
        features = [high_res_features_0, high_res_features_1]
        return self.decode(image_embeddings, features, point_coords, point_labels, mask_input, has_mask_input)


DECODERS = {"sam": _Decoder, "sam_hq": _DecoderHQ, "sam2": _Decoder2}


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
    if box is not None:
        coords.append(segmenter.to_input(box.reshape(2, 2), original))
        marks.append(torch.tensor([2.0, 3.0]))
    if box is None or segmenter.family == "sam2":
        coords.append(torch.zeros(1, 2, dtype=torch.float64))
        marks.append(torch.tensor([-1.0]))
    side = 4 * segmenter.model.prompt_encoder.image_embedding_size[0]
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
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise CvfmError(f"'{folder}' exists and is not empty: use --overwrite or another -o")
    folder.mkdir(parents=True, exist_ok=True)
    segmenter = segmenter.eval().float()
    size, extra = segmenter.input_size, EXTRA_FEATURES[segmenter.family]
    pixels = torch.zeros(2, 3, size, size)  # batch 2: an example batch of 1 would fix the batch size
    with torch.no_grad():
        features = _features(segmenter, pixels[:1])
    batch = torch.export.Dim("batch", min=1)
    outputs = ["image_embeddings", *extra]
    _export(_Encoder(segmenter), (pixels,), folder / "encoder.onnx", {"pixel_values": {0: batch}}, outputs)
    example = onnx_prompts(segmenter, (size, size), points=torch.tensor([[10.0, 10.0], [20.0, 5.0]]))
    points = torch.export.Dim("points", min=1)
    shapes = {name: None for name in outputs} | {
        "point_coords": {1: points},
        "point_labels": {1: points},
        "mask_input": None,
        "has_mask_input": None,
    }
    decoded = ["low_res_masks", "iou_predictions"]
    for multimask, name in ((True, "decoder.onnx"), (False, "decoder_single.onnx")):
        module = DECODERS[segmenter.family](segmenter, multimask)
        _export(module, (*features, *example.values()), folder / name, shapes, decoded)
    record = {
        "model": segmenter.name,
        "family": segmenter.family,
        "input_size": size,
        "preprocess": asdict(segmenter.preprocess),
        "encoder_outputs": outputs,
        "decoder_inputs": list(shapes),
        "decoder_outputs": decoded,
        "opset": OPSET,
    }
    (folder / "sam_onnx.json").write_text(json.dumps(record, indent=2) + "\n")
    return folder


def _export(module: nn.Module, args: tuple, path: Path, dynamic_shapes: dict, outputs: list[str]) -> None:
    names = list(dynamic_shapes)
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
