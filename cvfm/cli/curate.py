"""`cvfm curate dedup|decontaminate|retrieve`: data curation over `cvfm embed` output (SemDeDup, DINOv2's
relative deduplication and retrieval). Each step writes OUT/decisions.parquet, OUT/kept.jsonl,
OUT/dropped.txt and OUT/curate.json, prints curate.json as one JSON line, and logs to stderr."""

from __future__ import annotations

import typer

from cvfm.cli import common

app = typer.Typer(
    help="Curate a pool of images from its embeddings: deduplicate, decontaminate against evaluation "
    "data, retrieve around seed images. Every step keeps a decision (and its reason) for every item.",
    no_args_is_help=True,
)

EmbedDir = typer.Argument(
    ..., help="A cvfm embed output folder, or images (any --data spec) with --model to embed them first."
)
Output = typer.Option(..., "--output", "-o", help="Output folder (refused if it holds one, see --overwrite).")
Overwrite = typer.Option(False, "--overwrite", help="Replace the curation outputs in --output.")
Model = typer.Option(
    None,
    "--model",
    "-m",
    help="Embed images (given instead of embed outputs) with this model, into OUT/embeddings*/.",
)
Split = typer.Option(None, "--split", help="Split of images given with --model.")
BatchSize = typer.Option(256, "--batch-size", "-b", min=1, help="Batch size when embedding with --model.")


def _embedding(model, split, batch_size, num_workers):
    from cvfm.curate.inputs import EmbedOptions

    return EmbedOptions(model=model, split=split, batch_size=batch_size, num_workers=num_workers)


def _emit(summary: dict) -> None:
    from cvfm.cli.output import emit
    from cvfm.runtime.progress import log

    log(f"curate {summary['step']}: kept {summary['kept']} of {summary['rows']} -> {summary['output']}")
    if "no_manifest" in summary:
        log(f"curate {summary['step']}: no kept.jsonl: {summary['no_manifest']}")
    emit(summary)


@app.command("dedup")
def dedup(
    embed_dir: str = EmbedDir,
    output: str = Output,
    eps: list[float] = typer.Option(
        [0.05], "--eps", help="Drop items more similar than 1 - eps to an earlier one; repeat for a table."
    ),
    keep: str = typer.Option(
        "hard", "--keep", help="Of duplicates keep: hard (farthest from the centroid), easy, random."
    ),
    against: str = typer.Option(
        "kept",
        "--against-earlier",
        help="kept: compare with earlier kept items (greedy); any: with every earlier item (SemDeDup's code)",
    ),
    clusters: int = typer.Option(None, "--clusters", min=1, help="k-means clusters (default: 1 per 10,000)."),
    exact: bool = typer.Option(True, "--exact/--no-exact", help="Drop byte-identical images (SHA-256)."),
    seed: int = typer.Option(0, "--seed", help="Seed of k-means and of --keep random."),
    overwrite: bool = Overwrite,
    model: str = Model,
    split: str = Split,
    batch_size: int = BatchSize,
    num_workers: int = common.Workers,
) -> None:
    """Deduplicate: exact duplicates by content hash, then SemDeDup (k-means; within each cluster an item
    goes when its cosine similarity to an item kept before it exceeds 1 - eps).

    Several --eps are computed from one clustering: a table of kept / dropped per eps goes to stderr,
    kept.jsonl holds the items kept at the first eps and kept_eps<e>.jsonl those of each further one.
    decisions.parquet gives every item's reason (exact-duplicate-of / near-duplicate-of <id>, with the
    similarity), its cluster and distance to the centroid, and per-eps columns.

    Examples:

      cvfm curate dedup emb/ -o dedup/ --eps 0.05 --eps 0.1 --eps 0.2

      cvfm curate dedup photos/ --model timm/vit_small_patch14_dinov2.lvd142m -o dedup/ --keep random

      cvfm pretrain --data dedup/kept.jsonl --method dino -o runs/dino
    """
    from cvfm.curate.dedup import dedup as run

    embedding = _embedding(model, split, batch_size, num_workers)
    summary = run(
        embed_dir,
        output,
        eps=eps,
        keep=keep,
        against=against,
        clusters=clusters,
        exact=exact,
        seed=seed,
        overwrite=overwrite,
        embedding=embedding,
    )
    _emit(summary)


@app.command("decontaminate")
def decontaminate(
    embed_dir: str = EmbedDir,
    against: str = typer.Option(
        ..., "--against", help="The evaluation images: their embed output, or images with --model."
    ),
    output: str = Output,
    threshold: float = typer.Option(
        0.95,
        "--threshold",
        "-t",
        help="Drop pool items with cosine similarity >= this to an evaluation item.",
    ),
    overwrite: bool = Overwrite,
    model: str = Model,
    split: str = Split,
    batch_size: int = BatchSize,
    num_workers: int = common.Workers,
) -> None:
    """Drop pool items that are near-duplicates of evaluation images, so a benchmark does not measure
    memorised test images (DINOv2's relative deduplication).

    decisions.parquet holds every item's largest similarity to the evaluation set and, for dropped ones,
    the evaluation item it copies (contaminates). The default 0.95 matches curate dedup's default eps
    (0.05); lower it to catch looser copies (crops, edits).

    Examples:

      cvfm curate decontaminate emb/pool -o clean/ --against emb/imagenet-val

      cvfm curate decontaminate photos/ --against val_images/ --model hf/facebook/dinov2-small -o clean/
    """
    from cvfm.curate.decontaminate import decontaminate as run

    embedding = _embedding(model, split, batch_size, num_workers)
    _emit(run(embed_dir, against, output, threshold=threshold, overwrite=overwrite, embedding=embedding))


@app.command("retrieve")
def retrieve(
    embed_dir: str = EmbedDir,
    seeds: str = typer.Option(
        ..., "--seeds", help="The curated seed images: their embed output, or images with --model."
    ),
    output: str = Output,
    k: int = typer.Option(None, "--k", "-k", min=1, help="Nearest pool items per seed (default 4)."),
    clusters: str = typer.Option(
        None,
        "--clusters",
        help="A curate cluster output of the pool: take items from the seeds' clusters instead of k-NN.",
    ),
    per_cluster: int = typer.Option(
        None,
        "--per-cluster",
        min=1,
        help="With --clusters: items drawn per seed in a cluster (default: all).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the --per-cluster draw."),
    overwrite: bool = Overwrite,
    model: str = Model,
    split: str = Split,
    batch_size: int = BatchSize,
    num_workers: int = common.Workers,
) -> None:
    """Retrieve the pool items that look like a curated seed set (DINOv2's retrieval-based curation): each
    seed's k nearest pool items, or for a small seed set items of the seeds' clusters (--clusters).

    An item is kept when a seed retrieved it; decisions.parquet names the most similar such seed, the
    similarity, the item's rank among that seed's neighbours and how many seeds retrieved it.

    Examples:

      cvfm curate retrieve emb/pool --seeds emb/curated -k 4 -o retrieved/

      cvfm curate retrieve emb/pool --seeds emb/few --clusters clusters/ --per-cluster 1000 -o retrieved/
    """
    from cvfm.curate.retrieve import retrieve as run

    embedding = _embedding(model, split, batch_size, num_workers)
    summary = run(
        embed_dir,
        seeds,
        output,
        k=k,
        clusters=clusters,
        per_cluster=per_cluster,
        seed=seed,
        overwrite=overwrite,
        embedding=embedding,
    )
    _emit(summary)
