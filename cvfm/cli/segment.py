"""`cvfm segment prompt|text|auto|train|export`: Segment Anything on the command line (`cvfm.segment`).

Five subcommands, each only its options over a library function (so about 400 lines of declarations)."""

from __future__ import annotations

import typer

from cvfm.cli import common

app = typer.Typer(
    help="Segment Anything: promptable and automatic masks with SAM-family models; training; export.",
    no_args_is_help=True,
)

Model = typer.Argument(
    ..., help="Registry id or folder of a SAM model, e.g. cvfm/tiny-sam, hf/facebook/sam-vit-base."
)
# The options prompt, text and auto share (each writes per-image outputs that a rerun finishes).
Split = typer.Option(None, "--split", help="Split of a dataset with several.")
Precision = typer.Option("auto", "--precision", help="auto, fp32, bf16 or fp16 (auto: bf16 where native).")
FolderOverwrite = typer.Option(False, "--overwrite", help="Replace the output folder (default: finish it).")


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
    split: str = Split,
    precision: str = Precision,
    image_column: str = common.ImageColumn,
    strict: bool = common.Strict,
    overwrite: bool = FolderOverwrite,
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
    split: str = Split,
    precision: str = Precision,
    image_column: str = common.ImageColumn,
    strict: bool = common.Strict,
    overwrite: bool = FolderOverwrite,
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
    split: str = Split,
    precision: str = Precision,
    image_column: str = common.ImageColumn,
    strict: bool = common.Strict,
    overwrite: bool = FolderOverwrite,
    pretrained: bool = common.pretrained_option(True),
    trust_remote_code: bool = common.TrustRemoteCode,
    engine: str = common.EngineKind,
    address: str = common.Address,
    actors: int = common.Actors,
    settings=None,
) -> None:
    """Segment anything: masks for every object of every image, SAM's automatic mask generator with the
    reference defaults and amg.py's knobs. A folder output is resumable: finished images are skipped.
    --engine ray segments on Ray (an embedded one, or the cluster at --address): the same files.

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
        engine=common.engine(engine, address, actors),
    )
    if output != "-":
        emit(summary)


@app.command("train")
def train(
    model: str = typer.Option(
        None,
        "--model",
        help="The SAM to fine-tune: registry id or folder (cvfm/tiny-sam, hf/facebook/sam-vit-base, a run). "
        "Not needed with --resume.",
    ),
    data: str = typer.Option(
        None,
        "--data",
        "-d",
        help="Images with instance masks: builtin:animal-scenes, a COCO instances .json, or a folder with "
        "images/ and masks/ (instance-id PNGs). Not needed with --resume.",
    ),
    output: str = common.RunOutput,
    split: str = typer.Option(None, "--split", help="Split of --data (default for a built-in set: train)."),
    image_root: str = typer.Option(None, "--image-root", help="Folder of a COCO file's images."),
    pseudo: str = typer.Option(
        None,
        "--pseudo",
        help="A cvfm segment auto output for unlabelled images (amg or coco-rle folder, coco "
        "instances.json): its masks join the training data.",
    ),
    pseudo_images: str = typer.Option(
        None, "--pseudo-images", help="The --data that cvfm segment auto labelled (its images)."
    ),
    pseudo_split: str = typer.Option(None, "--pseudo-split", help="The --split that auto labelled."),
    pseudo_min_iou: float = typer.Option(
        0.0, "--pseudo-min-iou", help="Keep auto masks of at least this predicted IoU (0: all auto kept)."
    ),
    pseudo_min_stability: float = typer.Option(
        0.0, "--pseudo-min-stability", help="Keep auto masks of at least this stability score."
    ),
    encoder: str = typer.Option(
        None,
        "--encoder",
        help="A cvfm image backbone (registry id or run folder, e.g. a pretrain --method mae run) in place "
        "of the SAM's image encoder, through a fresh neck to its embedding; the prompt encoder and mask "
        "decoder stay the SAM's (MobileSAM's design). The neck always trains.",
    ),
    train_encoder: bool = typer.Option(
        False,
        "--train-encoder",
        help="Also train the image encoder (with --encoder: the backbone) (default: frozen, decoder only).",
    ),
    epochs: int = typer.Option(10, "--epochs", min=1),
    batch_size: int = typer.Option(8, "--batch-size", "-b", min=1, help="Images per process."),
    lr: float = typer.Option(None, "--lr", help="Peak learning rate (default 8e-4 x sqrt(batch / 256))."),
    grad_accum: int = common.GradAccum,
    precision: str = common.TrainPrecision,
    seed: int = typer.Option(0, "--seed"),
    num_workers: int = common.RunWorkers,
    checkpoint_every: int = common.CheckpointEvery,
    log: list[str] = common.Log,
    opt: list[str] = typer.Option(
        None,
        "--opt",
        help="Recipe option key=value: instances (masks per image and step, 8), clicks (corrective "
        "clicks, 3), refine (iterations without a click, 2), box_share (0.5), focal_weight (20), "
        "dice_weight (1), iou_weight (1).",
    ),
    strict: bool = common.Strict,
    overwrite: bool = common.RunOverwrite,
    resume: bool = common.Resume,
    trust_remote_code: bool = common.TrustRemoteCode,
) -> None:
    """Fine-tune a SAM on your images with instance masks, by the SAM paper's interactive recipe: per object a
    point in its mask or its jittered box, then corrective clicks drawn from the error region with the
    previous logits fed back; focal + dice loss (20:1) and the IoU head's squared error. The image encoder
    stays frozen unless --train-encoder.

    With --encoder, any cvfm backbone with patch tokens or a feature map replaces the SAM's ViT: a linear neck
    maps its tokens to the SAM's embedding (channels and grid) and trains with the prompt encoder and mask
    decoder.

    SAM's data engine: train on labelled images, label more with cvfm segment auto <run>, then train again
    with --pseudo (the auto output) and --pseudo-images (the data auto read).

    Writes run.json, metrics.jsonl, curves.png, checkpoints/ and backbone/ (the trained segmenter, which
    cvfm segment prompt|auto, cvfm evaluate segmentation and create_segmenter load from the run folder).
    Ctrl-C or SIGTERM writes a checkpoint first; --resume continues from the last one (also after a kill)
    and ends with the weights of an uninterrupted run (bit for bit on CPU).

    Examples:

      cvfm segment train --model cvfm/tiny-sam --data builtin:animal-scenes --split train -o runs/sam

      cvfm segment train --model hf/facebook/sam-vit-base --data coco/annotations.json -o runs/sam-b

      cvfm segment train --model cvfm/tiny-sam --encoder runs/mae --data builtin:animal-scenes -o runs/sam-mae

      cvfm segment auto runs/sam --data unlabelled/ -o auto/

      cvfm segment train --model runs/sam --data labelled/ --pseudo auto/ --pseudo-images unlabelled/ \\
        --pseudo-min-iou 0.9 -o runs/sam2

      cvfm segment train -o runs/sam --resume
    """
    from cvfm.cli.output import emit_run
    from cvfm.errors import UsageError
    from cvfm.segment.train import SegmentTrainConfig, segment_train

    if not resume and not (model and data):
        raise UsageError("--model and --data are required (unless --resume continues an existing run)")
    cfg = SegmentTrainConfig(
        data=data or "",
        output=output,
        model=model or "",
        split=split,
        image_root=image_root,
        pseudo=pseudo,
        pseudo_images=pseudo_images,
        pseudo_split=pseudo_split,
        pseudo_min_iou=pseudo_min_iou,
        pseudo_min_stability=pseudo_min_stability,
        encoder=encoder,
        train_encoder=train_encoder,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        grad_accum=grad_accum,
        precision=precision,
        seed=seed,
        num_workers=num_workers,
        checkpoint_every=checkpoint_every,
        log=tuple(log),
        options=common.parse_options(opt),
        strict=strict,
        overwrite=overwrite,
        resume=resume,
        trust_remote_code=trust_remote_code,
    )
    emit_run(segment_train(cfg))


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
    """Export both halves of a SAM, SAM-HQ or SAM 2: the image encoder (encoder.onnx, with the extra
    features SAM-HQ and SAM 2 decoders read) and the prompt encoder + mask decoder with any number of
    points (decoder.onnx: 3 masks per prompt; decoder_single.onnx: one), with sam_onnx.json describing the
    inputs. Needs onnx and onnxscript (cvfm's "onnx" extra).

    Examples:

      cvfm segment export cvfm/tiny-sam --onnx -o sam-onnx

      cvfm segment export hf/facebook/sam-vit-base --onnx -o sam-b-onnx

      cvfm segment export hf/facebook/sam2.1-hiera-tiny --onnx -o sam2-onnx
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
