"""`cvfm embed`: image embeddings of any registry model."""

from __future__ import annotations

import typer

from cvfm.cli import common


def embed(
    model: str = typer.Argument(..., help="Registry id or run folder."),
    data: str = common.Data,
    output: str = typer.Option(..., "--output", "-o", help="Output folder, or - for JSON lines on stdout."),
    split: str = typer.Option(None, "--split"),
    batch_size: int = typer.Option(256, "--batch-size", "-b", min=1),
    num_workers: int = common.Workers,
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="L2-normalise the embeddings."),
    random_init: bool = typer.Option(False, "--random-init", help="Ignore pretrained weights."),
    image_column: str = common.ImageColumn,
    label_column: str = common.LabelColumn,
    strict: bool = common.Strict,
    trust_remote_code: bool = common.TrustRemoteCode,
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output folder."),
) -> None:
    """Embed images: img_emb/img_emb_0.npy + metadata/metadata_0.parquet (same row order), or JSONL.

    Examples:

      cvfm embed runs/dino --data builtin:animal-mnist -o emb/

      cvfm embed timm/resnet50.a1_in1k --data photos/ -o - | head -1
    """
    from cvfm.embed import embed_images
    from cvfm.runtime.progress import log

    summary = embed_images(
        model,
        data,
        output,
        split=split,
        batch_size=batch_size,
        num_workers=num_workers,
        normalize=normalize,
        overwrite=overwrite,
        strict=strict,
        image_column=image_column,
        label_column=label_column,
        pretrained=not random_init,
        trust_remote_code=trust_remote_code,
    )
    log(f"embedded {summary['rows']} images ({summary['dim']} dims), skipped {len(summary['skipped'])}")
    if output != "-":
        from cvfm.cli.app import emit

        emit(summary)


def register(app: typer.Typer) -> None:
    app.command("embed")(embed)
