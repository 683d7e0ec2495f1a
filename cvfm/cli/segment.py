"""`cvfm segment prompt|text|auto|export`: Segment Anything from the command line over `cvfm.segment`."""

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


@app.command("text")
@common.with_auto_settings
def text(
    model: str = Model,
    data: str = common.Data,
    texts: list[str] = typer.Option(
        ..., "--text", "-t", help="What to segment, e.g. 'a red giraffe'; repeat for several (a record each)."
    ),
    strategy: str = typer.Option(
        "clip-rerank",
        "--strategy",
        help="clip-rerank: automatic masks ranked by an image-text model; detector: an open-vocabulary "
        "detector's boxes as SAM box prompts.",
    ),
    clip: str = typer.Option(
        "cvfm/tiny-clip",
        "--clip",
        help="clip-rerank's image-text model: hf/openai/clip-vit-base-patch32, open_clip/ViT-B-32:openai, "
        "hf/google/siglip-base-patch16-224, a folder (default: the random tiny one, for offline tests).",
    ),
    detector: str = typer.Option(
        "cvfm/tiny-owlv2",
        "--detector",
        help="The detector: hf/google/owlv2-base-patch16-ensemble, hf/google/owlvit-base-patch32, "
        "hf/IDEA-Research/grounding-dino-tiny, a save_pretrained folder (default: the random tiny one).",
    ),
    top_k: int = typer.Option(
        None,
        "--top-k",
        min=1,
        help="Masks kept per text, best first (default: 1 for clip-rerank without --threshold, else all).",
    ),
    threshold: float = typer.Option(
        None,
        "--threshold",
        help="clip-rerank: keep masks whose cosine similarity to the text is at least this.",
    ),
    box_threshold: float = typer.Option(
        None,
        "--box-threshold",
        help="detector: keep boxes scored above this (default: 0.1 for OWL, 0.35 for Grounding DINO).",
    ),
    output: str = typer.Option(
        "-", "--output", "-o", help="A folder (PNG masks, masks.jsonl, overlay.png per image), or -."
    ),
    split: str = typer.Option(None, "--split", help="Split of a dataset with several."),
    precision: str = typer.Option(
        "auto", "--precision", help="auto, fp32, bf16 or fp16 (auto: bf16 where native)."
    ),
    image_column: str = common.ImageColumn,
    strict: bool = common.Strict,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an output folder (default: finish it)."
    ),
    pretrained: bool = common.pretrained_option(True, " Applies to every model of the run."),
    trust_remote_code: bool = common.TrustRemoteCode,
    settings=None,
) -> None:
    """Masks for a text. clip-rerank (default): SAM's automatic masks (the generator's knobs below), each
    mask's box with the background outside the mask set to grey, scored against the text by an image-text
    model (score: cosine similarity; probability: softmax over the image's masks). detector: an
    open-vocabulary detector (OWL-ViT, OWLv2, Grounding DINO) finds boxes for the text and SAM turns each
    into a mask (score: the detector's). With -o -, one JSON line per image and text: id, image, text,
    strategy, masks (segmentation as COCO RLE, area, bbox, predicted_iou, stability_score, score), best
    first.

    Examples:

      cvfm segment text hf/facebook/sam-vit-base --data photos/ --text "a red giraffe" \\
        --clip hf/openai/clip-vit-base-patch32 -o -

      cvfm segment text hf/facebook/sam-vit-base --data photos/ --text "a dog" --strategy detector \\
        --detector hf/google/owlv2-base-patch16-ensemble --box-threshold 0.2 -o masks/
    """
    from cvfm.cli.output import emit
    from cvfm.segment.text import segment_text

    summary = segment_text(
        model,
        data,
        output,
        texts=texts,
        strategy=strategy,
        clip=clip,
        detector=detector,
        top_k=top_k,
        threshold=threshold,
        box_threshold=box_threshold,
        settings=settings,
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
@common.with_auto_settings
def auto(
    model: str = Model,
    data: str = common.Data,
    output: str = typer.Option(..., "--output", "-o", help="A folder (resumable), or - for JSON lines."),
    fmt: str = typer.Option(
        "amg", "--format", help="amg (amg.py's folders + metadata.csv), coco-rle, coco, yolo."
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
    settings=None,
) -> None:
    """Segment anything: masks for every object of every image, SAM's automatic mask generator with the
    reference defaults and amg.py's knobs. A folder output is resumable: finished images are skipped.

    Examples:

      cvfm segment auto cvfm/tiny-sam --data builtin:animal-scenes --split test -o masks/

      cvfm segment auto hf/facebook/sam-vit-base --data photos/ -o coco/ --format coco --crop-n-layers 1
    """
    from cvfm.cli.output import emit
    from cvfm.segment.auto_run import segment_auto

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
    sam_onnx.json describing the inputs. Needs onnx and onnxscript (cvfm's "onnx" extra).

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
