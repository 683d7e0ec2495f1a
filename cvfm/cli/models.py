"""`cvfm models`: list the registry."""

from __future__ import annotations

import typer

from cvfm.registry import list_models


def models(
    pattern: str = typer.Argument("*", help="Glob over ids, e.g. 'cvfm/*' or 'timm/*dino*'."),
    timm: bool = typer.Option(False, "--timm", help="Include every timm architecture (timm/<arch>)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line instead of a table."),
) -> None:
    """List registry models.

    Ids name their source: cvfm/<preset>, timm/<arch>[.tag], hf/<repo-id>, or a local folder
    (a cvfm run folder, a timm export, a transformers save_pretrained folder).

    Examples:

      cvfm models

      cvfm models 'timm/*vit_small*' --timm --json
    """
    from cvfm.cli.app import emit

    rows = list_models(pattern, sources=("cvfm", "timm") if timm else ("cvfm",))
    if as_json:
        for row in rows:
            emit(row)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "source", "kind", "input", "description")
    for r in rows:
        table.add_row(r["id"], r["source"], r["kind"], str(r["input_size"] or ""), r["description"])
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
