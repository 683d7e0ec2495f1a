"""`cvfm segment prompt|auto|export`: Segment Anything from the command line over `cvfm.segment`."""

from __future__ import annotations

import typer

from cvfm.cli import common

app = typer.Typer(
    help="Segment Anything: promptable and automatic masks with SAM-family models, and their export.",
    no_args_is_help=True,
)

Model = typer.Argument(
    ..., help="Registry id or folder of a SAM model, e.g. cvfm/tiny-sam, hf/facebook/sam-vit-base."
)


@app.command("prompt")
def prompt(
    model: str = Model,
    data: str = typer.Option(
        None, "--data", "-d", help="Images: a folder, a JSONL manifest, builtin:<name>, hf:<dataset>."
    ),
    point: list[str] = typer.Option(
        [], "--point", help="x,y[,label] in pixels of the image (label 1 foreground, 0 background); repeat."
    ),
    box: list[str] = typer.Option(
        [], "--box", help="x0,y0,x1,y1 in pixels of the image; repeat for one mask each."
    ),
    prompts: str = typer.Option(
        None, "--prompts", help="JSONL: one prompt per line for many images (see below)."
    ),
    multimask: bool = typer.Option(
        None, "--multimask/--single", help="3 masks per prompt or one (default: 3 for one point alone)."
    ),
    output: str = typer.Option(
        "-", "--output", "-o", help="A folder (PNG masks, masks.jsonl, overlay.png), or -."
    ),
    cache: str = typer.Option(None, "--cache", help="Keep image embeddings in this folder for later runs."),
    split: str = typer.Option(None, "--split", help="Split of a dataset with several."),
    precision: str = typer.Option(
        "auto", "--precision", help="auto, fp32, bf16 or fp16 (auto: bf16 where native)."
    ),
    image_column: str = common.ImageColumn,
    strict: bool = common.Strict,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an output folder (default: finish it)."
    ),
    pretrained: bool = common.pretrained_option(True),
    trust_remote_code: bool = common.TrustRemoteCode,
) -> None:
    """Masks for point and box prompts. Each image is embedded once for all its prompts. With -o -, one JSON
    line per image and prompt: id, image, prompt, masks (segmentation as COCO RLE, area, bbox, predicted_iou,
    stability_score; best first). A prompts file has lines like
    {"image": "cat.jpg", "points": [[120, 80], [60, 40]], "labels": [1, 0], "box": [10, 12, 200, 180]}.

    Examples:

      cvfm segment prompt cvfm/tiny-sam --data photos/ --point 120,80 -o -

      cvfm segment prompt hf/facebook/sam-vit-base --prompts prompts.jsonl -o masks/ --cache emb/
    """
    from cvfm.cli.output import emit
    from cvfm.segment.prompt_run import segment_prompts

    summary = segment_prompts(
        model,
        data,
        output,
        points=point,
        boxes=box,
        prompts=prompts,
        multimask=multimask,
        cache=cache,
        split=split,
        image_column=image_column,
        precision=precision,
        strict=strict,
        overwrite=overwrite,
        pretrained=pretrained,
        trust_remote_code=trust_remote_code,
    )
    if output != "-":
        emit(summary)


@app.command("auto")
def auto(
    model: str = Model,
    data: str = common.Data,
    output: str = typer.Option(..., "--output", "-o", help="A folder (resumable), or - for JSON lines."),
    fmt: str = typer.Option(
        "amg", "--format", help="amg (amg.py's folders + metadata.csv), coco-rle, coco, yolo."
    ),
    points_per_side: int = typer.Option(32, "--points-per-side", help="Grid of point prompts per side."),
    points_per_batch: int = typer.Option(64, "--points-per-batch", help="Points decoded together."),
    pred_iou_thresh: float = typer.Option(0.88, "--pred-iou-thresh", help="Keep masks predicted this good."),
    stability_score_thresh: float = typer.Option(
        0.95, "--stability-score-thresh", help="Keep masks this stable."
    ),
    stability_score_offset: float = typer.Option(
        1.0, "--stability-score-offset", help="Logit offset of stability."
    ),
    box_nms_thresh: float = typer.Option(
        0.7, "--box-nms-thresh", help="Box IoU above which a duplicate goes."
    ),
    crop_n_layers: int = typer.Option(
        0, "--crop-n-layers", help="Layers of overlapping crops (0: whole image)."
    ),
    crop_nms_thresh: float = typer.Option(0.7, "--crop-nms-thresh", help="Box NMS across crops."),
    crop_overlap_ratio: float = typer.Option(512 / 1500, "--crop-overlap-ratio", help="Overlap of crops."),
    crop_n_points_downscale_factor: int = typer.Option(
        1, "--crop-n-points-downscale-factor", help="Fewer points per side in each deeper crop layer."
    ),
    min_mask_region_area: int = typer.Option(
        0, "--min-mask-region-area", help="Remove islands / holes below."
    ),
    images_per_batch: int = typer.Option(1, "--images-per-batch", help="Crops through the encoder together."),
    overlays: bool = typer.Option(False, "--overlays", help="Also write overlays/<image>.png."),
    split: str = typer.Option(None, "--split", help="Split of a dataset with several."),
    precision: str = typer.Option(
        "auto", "--precision", help="auto, fp32, bf16 or fp16 (auto: bf16 where native)."
    ),
    image_column: str = common.ImageColumn,
    strict: bool = common.Strict,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace the output folder (default: finish it)."
    ),
    pretrained: bool = common.pretrained_option(True),
    trust_remote_code: bool = common.TrustRemoteCode,
) -> None:
    """Segment anything: masks for every object of every image, SAM's automatic mask generator with the
    reference defaults and amg.py's knobs. A folder output is resumable: finished images are skipped.

    Examples:

      cvfm segment auto cvfm/tiny-sam --data builtin:animal-scenes --split test -o masks/

      cvfm segment auto hf/facebook/sam-vit-base --data photos/ -o coco/ --format coco --crop-n-layers 1
    """
    from cvfm.cli.output import emit
    from cvfm.models.amg import AutoSettings
    from cvfm.segment.auto_run import segment_auto

    settings = AutoSettings(
        points_per_side=points_per_side,
        points_per_batch=points_per_batch,
        pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_score_thresh,
        stability_score_offset=stability_score_offset,
        box_nms_thresh=box_nms_thresh,
        crop_n_layers=crop_n_layers,
        crop_nms_thresh=crop_nms_thresh,
        crop_overlap_ratio=crop_overlap_ratio,
        crop_n_points_downscale_factor=crop_n_points_downscale_factor,
        min_mask_region_area=min_mask_region_area,
    )
    summary = segment_auto(
        model,
        data,
        output,
        fmt=fmt,
        settings=settings,
        images_per_batch=images_per_batch,
        overlays=overlays,
        split=split,
        image_column=image_column,
        precision=precision,
        strict=strict,
        overwrite=overwrite,
        pretrained=pretrained,
        trust_remote_code=trust_remote_code,
    )
    if output != "-":
        emit(summary)


@app.command("export")
def export(
    model: str = Model,
    onnx: bool = typer.Option(False, "--onnx", help="Export to ONNX (the only format so far; required)."),
    output: str = typer.Option(
        ..., "--output", "-o", help="Folder for the .onnx files (refused if not empty)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the files of a non-empty folder."),
    pretrained: bool = common.pretrained_option(True),
    trust_remote_code: bool = common.TrustRemoteCode,
) -> None:
    """Export both halves of a SAM: the image encoder (encoder.onnx) and the prompt encoder + mask decoder
    with any number of points (decoder.onnx: 3 masks per prompt; decoder_single.onnx: one), with
    sam_onnx.json describing the inputs. Needs `pip install cvfm[onnx]`.

    Examples:

      cvfm segment export cvfm/tiny-sam --onnx -o sam-onnx

      cvfm segment export hf/facebook/sam-vit-base --onnx -o sam-b-onnx
    """
    from cvfm.cli.output import emit
    from cvfm.errors import UsageError
    from cvfm.registry import create_segmenter

    if not onnx:
        raise UsageError("say which format: --onnx")
    try:
        from cvfm.segment.onnx_export import export_onnx
    except ImportError as e:
        raise UsageError(f"ONNX export needs onnx and onnxscript (pip install 'cvfm[onnx]'): {e}") from None
    segmenter = create_segmenter(model, pretrained=pretrained, trust_remote_code=trust_remote_code)
    folder = export_onnx(segmenter, output, overwrite=overwrite)
    emit({"model": model, "output": str(folder), "files": sorted(p.name for p in folder.iterdir())})


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="segment")
