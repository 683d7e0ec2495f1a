"""`cvfm embed`: image and/or text embeddings of any registry model, in parts, resumable, shardable."""

from __future__ import annotations

import os

import typer

from cvfm.cli import common


def embed(
    model: str = typer.Argument(..., help="Registry id or run folder (an image-text model for texts)."),
    data: str = typer.Option(
        ..., "--data", "-d", help=common.DATA_HELP + " - reads image paths or JSON lines from stdin."
    ),
    output: str = typer.Option(..., "--output", "-o", help="Output folder, or - for JSON lines on stdout."),
    split: str = typer.Option(None, "--split"),
    text_column: str = typer.Option(
        None,
        "--text-column",
        help="Also embed this text field (JSONL / hf: column; needs an image-text model).",
    ),
    images: bool = typer.Option(
        True, "--images/--no-images", help="Embed the images (--no-images: texts only)."
    ),
    batch_size: int = typer.Option(256, "--batch-size", "-b", min=1),
    num_workers: int = common.Workers,
    precision: str = typer.Option(
        "auto", "--precision", help="auto|fp32|bf16|fp16 (auto: bf16 where the hardware has it, else fp32)."
    ),
    dtype: str = typer.Option("float32", "--dtype", help="Stored embeddings: float32 or float16."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="L2-normalise the embeddings."),
    part_size: int = typer.Option(10_000, "--part-size", min=1, help="Rows per output part (file set)."),
    shard_id: int = typer.Option(0, "--shard-id", min=0, help="This job's shard (parts p % num_shards)."),
    num_shards: int = typer.Option(1, "--num-shards", min=1, help="Jobs sharing the work."),
    pretrained: bool = common.pretrained_option(True),
    image_column: str = common.ImageColumn,
    label_column: str = common.LabelColumn,
    strict: bool = common.Strict,
    trust_remote_code: bool = common.TrustRemoteCode,
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace an output of another configuration (or write into a foreign folder).",
    ),
    engine: str = common.EngineKind,
    address: str = common.Address,
    actors: int = common.Actors,
) -> None:
    """Embed images and/or texts: img_emb/img_emb_{p}.npy, text_emb/text_emb_{p}.npy and
    metadata/metadata_{p}.parquet per part of --part-size rows (same row order), or JSON lines with -o -.

    Each JSON line holds a row's metadata (id, image path, label: the class name, or null when unknown;
    caption) and its image_embedding / text_embedding. With --data - -o - the lines on stdin are embedded
    as they arrive, a batch as soon as its lines are there; -o FOLDER reads all of stdin first. A line
    holding a path is identified by that path.

    A rerun of the same command resumes: parts already written are kept, the rest is computed. Under
    `accelerate launch` the processes split the parts; --shard-id/--num-shards split them across jobs.
    --engine ray runs the batches on Ray (an embedded one, or the cluster at --address): the same files.

    Examples:

      cvfm embed runs/dino --data builtin:animal-mnist -o emb/

      cvfm embed cvfm/tiny-clip --data pairs.jsonl --text-column caption -o emb/

      find photos -name '*.jpg' | cvfm embed timm/resnet50.a1_in1k --data - -o - | head -1

      cvfm embed hf/openai/clip-vit-base-patch32 --data photos/ -o emb/ --engine ray --address auto
    """
    from cvfm.embed import embed as run_embed
    from cvfm.runtime.progress import log

    run_engine = common.engine(engine, address, actors)
    summary = run_embed(
        model,
        data,
        output,
        split=split,
        text_column=text_column,
        images=images,
        batch_size=batch_size,
        num_workers=num_workers,
        precision=precision,
        dtype=dtype,
        normalize=normalize,
        part_size=part_size,
        shard_id=shard_id,
        num_shards=num_shards,
        overwrite=overwrite,
        strict=strict,
        image_column=image_column,
        label_column=label_column,
        pretrained=pretrained,
        trust_remote_code=trust_remote_code,
        engine=run_engine,
    )
    if int(os.environ.get("RANK", "0")) != 0:  # one summary per launch, from the first process
        return
    parts, skipped = summary["parts"], len(summary["skipped"])
    if output == "-":
        log(f"embed: {summary['rows']} rows, {skipped} skipped")
        return
    log(
        f"embed: {summary['rows']} rows, {parts['written']} parts written, {parts['already_done']} already "
        f"done, {skipped} skipped"
    )
    from cvfm.cli.output import emit

    emit(summary)


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
