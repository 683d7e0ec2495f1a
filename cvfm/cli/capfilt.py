"""`cvfm capfilt`: BLIP's CapFilt over a JSONL of image-text pairs (caption, score, keep what matches)."""

from __future__ import annotations

import typer

from cvfm.cli import common


def capfilt(
    data: str = typer.Option(
        ...,
        "--in",
        "-i",
        "--data",
        "-d",
        help='JSONL of pairs {"id"?, "image", "text"} (paths relative to it), or - for stdin.',
    ),
    output: str = typer.Option(
        ..., "--out", "-o", "--output", help="Output .jsonl file (resumable), or - for stdout."
    ),
    rejects: str = typer.Option(
        None,
        "--rejects",
        help="Rejected lines (malformed, unreadable image) go here. Default: <out stem>.rejects.jsonl "
        "beside a file output; with --out -, JSON lines on stderr.",
    ),
    captioner: str = typer.Option(
        "cvfm/tiny-blip", "--captioner", help="BLIP captioner: registry id or folder."
    ),
    matcher: str = typer.Option(None, "--matcher", help="BLIP ITM model (default: the --captioner id)."),
    num_captions: int = typer.Option(1, "--num-captions", "-n", min=0, help="Synthetic captions per pair."),
    top_p: float = typer.Option(0.9, "--top-p", help="Nucleus sampling mass (1.0: plain sampling)."),
    prompt: str = typer.Option("a picture of", "--prompt", help="Caption prefix (stripped from the output)."),
    threshold: float = typer.Option(
        0.5, "--threshold", "-t", help="Keep captions with ITM P(match) >= this."
    ),
    max_length: int = typer.Option(
        30, "--max-length", min=1, help="Longest caption in tokens (prompt included)."
    ),
    min_length: int = typer.Option(5, "--min-length", min=0, help="Shortest caption in tokens."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1),
    num_workers: int = common.Workers,
    seed: int = typer.Option(
        0, "--seed", help="Sampling seed (each caption seeded by seed, pair id, index)."
    ),
    precision: str = typer.Option("auto", "--precision", help="auto|fp32|bf16|fp16."),
    text_column: str = typer.Option("text", "--text-column", help="Field of the web caption."),
    image_column: str = typer.Option("image", "--image-column", help="Field of the image path."),
    pretrained: bool = common.pretrained_option(True),
    trust_remote_code: bool = common.TrustRemoteCode,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an output written with other settings (or not by capfilt)."
    ),
    engine: str = common.EngineKind,
    address: str = common.Address,
    actors: int = common.Actors,
) -> None:
    """Caption and filter image-text pairs (BLIP's CapFilt): sample synthetic captions, score the web
    caption and each synthetic one with the ITM head, keep those scoring >= --threshold.

    Each output line is the input record plus "line", "captions" (kept, web first) and "scores" (every
    caption: source, itm, kept, and the reason of a drop). Every input line lands in the output or the
    rejects file. Rerunning the same command resumes a file output; a summary (counts, drop reasons,
    ITM histogram) goes to stderr, and with a file output also as one JSON line to stdout. Lines are
    filtered as they arrive: with --in -, records come out while the writer of stdin is still writing.
    --engine ray filters the batches on Ray (an embedded one, or the cluster at --address): the same
    lines; it reads the whole input first (--in - to a file: all of stdin; --in - --out - is refused).

    Examples:

      CAP=hf/Salesforce/blip-image-captioning-base; ITM=hf/Salesforce/blip-itm-base-coco

      cvfm capfilt --in pairs.jsonl --out filtered.jsonl --captioner $CAP --matcher $ITM

      cvfm capfilt --in pairs.jsonl --out filtered.jsonl --num-captions 5 --threshold 0.6

      cat pairs.jsonl | cvfm capfilt --in - --out - --rejects bad.jsonl | jq -c .captions

      cvfm capfilt --in pairs.jsonl --out filtered.jsonl --engine ray --address auto
    """
    from cvfm.capfilt import capfilt as run_capfilt
    from cvfm.capfilt.rules import format_summary
    from cvfm.runtime.progress import log

    run_engine = common.engine(engine, address, actors)
    summary = run_capfilt(
        data,
        output,
        captioner=captioner,
        matcher=matcher,
        rejects=rejects,
        num_captions=num_captions,
        top_p=top_p,
        prompt=prompt,
        threshold=threshold,
        max_length=max_length,
        min_length=min_length,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        precision=precision,
        text_column=text_column,
        image_column=image_column,
        overwrite=overwrite,
        pretrained=pretrained,
        trust_remote_code=trust_remote_code,
        engine=run_engine,
    )
    log(format_summary(summary))
    if output != "-":
        from cvfm.cli.output import emit

        emit(summary)


def register(app: typer.Typer) -> None:
    """Attach `cvfm capfilt`."""
    app.command("capfilt")(capfilt)
