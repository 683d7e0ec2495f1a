"""`cvfm models`: list the registry."""

from __future__ import annotations

import sys

import typer

from cvfm.registry import list_models

PIPED_WIDTH = 200  # columns of the table when stdout is not a terminal


def models(
    pattern: str = typer.Argument("*", help="Glob over ids, e.g. 'cvfm/*' or 'timm/*dino*'."),
    timm: bool = typer.Option(False, "--timm", help="Include every timm architecture (timm/<arch>)."),
    open_clip: bool = typer.Option(
        False,
        "--open-clip",
        help="Include open_clip models (open_clip/<arch>; with ':' in the pattern, tags).",
    ),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line instead of a table."),
) -> None:
    """List registry models.

    Ids name their source: cvfm/<preset>, timm/<arch>[.tag], hf/<repo-id> (vision backbones and
    CLIP-like image-text models), open_clip/<arch>:<tag> or open_clip/hf-hub:<org>/<repo>, or a local
    folder (a cvfm run folder, a timm export, a transformers save_pretrained folder, an open_clip folder).

    Examples:

      cvfm models

      cvfm models 'timm/*vit_small*' --timm --json

      cvfm models 'open_clip/ViT-B-32:*' --open-clip
    """
    from cvfm.cli.output import emit

    sources = ("cvfm",) + (("timm",) if timm else ()) + (("open_clip",) if open_clip else ())
    rows = list_models(pattern, sources=sources)
    if as_json:
        for row in rows:
            emit(row)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "source", "kind", "input", "description")
    table.columns[0].no_wrap = True  # ids are copied into commands: never fold them
    for r in rows:
        table.add_row(r["id"], r["source"], r["kind"], str(r["input_size"] or ""), r["description"])
    # Off a terminal (a pipe, a CI log) keep each row on its line, as --help does.
    Console(width=None if sys.stdout.isatty() else PIPED_WIDTH).print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
