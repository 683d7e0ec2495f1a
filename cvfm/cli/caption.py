"""`cvfm caption`: BLIP captions for a folder, a manifest, an hf: dataset or stdin, as JSON lines."""

from __future__ import annotations

import typer

from cvfm.cli import common


def caption(
    model: str = typer.Argument(
        ..., help="A BLIP captioner: cvfm/tiny-blip, hf/<repo> (BlipForConditionalGeneration) or a folder."
    ),
    data: str = typer.Option(
        ..., "--data", "-d", help=common.DATA_HELP + " - reads image paths or JSON lines from stdin."
    ),
    output: str = typer.Option(
        "-", "--output", "-o", help="A .jsonl file (resumable: a rerun finishes it), or - for stdout."
    ),
    prompt: str = typer.Option(None, "--prompt", help="Text the captions start from, e.g. 'a picture of'."),
    num_beams: int = typer.Option(3, "--num-beams", help="Beam width of beam search (the default decoding)."),
    top_p: float = typer.Option(
        None, "--top-p", help="Nucleus sampling with this top-p (e.g. 0.9) instead of beam search."
    ),
    num_captions: int = typer.Option(
        1, "--num-captions", help='Captions per image (a "captions" list when > 1).'
    ),
    max_length: int = typer.Option(30, "--max-length", help="Most tokens per caption (prompt included)."),
    min_length: int = typer.Option(5, "--min-length", help="Fewest tokens per caption."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty"),
    batch_size: int = typer.Option(32, "--batch-size", "-b"),
    seed: int = typer.Option(
        0, "--seed", help="Seed of nucleus sampling (the same seed, the same captions)."
    ),
    precision: str = typer.Option(
        "auto", "--precision", help="auto|fp32|bf16|fp16 (auto: bf16 where the hardware has it, else fp32)."
    ),
    split: str = typer.Option(None, "--split"),
    image_column: str = common.ImageColumn,
    num_workers: int = common.Workers,
    strict: bool = common.Strict,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an output file made with other settings (or not by cvfm)."
    ),
    pretrained: bool = common.pretrained_option(True),
    trust_remote_code: bool = common.TrustRemoteCode,
    engine: str = common.EngineKind,
    address: str = common.Address,
    actors: int = common.Actors,
) -> None:
    """Caption images: one JSON line {"id", "image", "caption"} per image, in the data's order.

    Beam search by default; --top-p samples (seeded per batch by --seed, so a rerun gives the same
    captions). With -o FILE a rerun of the same command resumes: complete lines are kept, the rest is
    computed; FILE.json records the settings, FILE.rejects the unreadable images. With --data - -o -
    the lines on stdin are captioned as they arrive, a batch as soon as its lines are there. --engine ray
    captions the batches on Ray (an embedded one, or the cluster at --address): the same lines.

    Examples:

      cvfm caption hf/Salesforce/blip-image-captioning-base --data photos/ -o captions.jsonl

      cvfm caption cvfm/tiny-blip --data builtin:animal-mnist --prompt "a picture of" --num-beams 5

      find photos -name '*.jpg' | cvfm caption cvfm/tiny-blip --data - -o - --top-p 0.9 --num-captions 3
    """
    from cvfm.caption import caption as run_caption

    run_engine = common.engine(engine, address, actors)
    summary = run_caption(
        model,
        data,
        output,
        split=split,
        prompt=prompt,
        num_beams=num_beams,
        top_p=top_p,
        num_captions=num_captions,
        max_length=max_length,
        min_length=min_length,
        repetition_penalty=repetition_penalty,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        precision=precision,
        strict=strict,
        overwrite=overwrite,
        image_column=image_column,
        pretrained=pretrained,
        trust_remote_code=trust_remote_code,
        engine=run_engine,
    )
    if output != "-":
        from cvfm.cli.output import emit

        emit(summary)


def register(app: typer.Typer) -> None:
    """Attach `cvfm caption`."""
    app.command("caption")(caption)
