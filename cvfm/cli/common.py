"""Options shared by several subcommands."""

from __future__ import annotations

import typer

from cvfm.errors import UsageError

DATA_HELP = (
    "Images: a folder (class sub-folders = labels), a .jsonl manifest, hf:<dataset> or builtin:<name>."
)

Data = typer.Option(..., "--data", "-d", help=DATA_HELP)
ImageColumn = typer.Option("image", "--image-column", help="Image column of an hf: dataset.")
LabelColumn = typer.Option(
    None, "--label-column", help="Label column of an hf: dataset (default: 'label' if present)."
)
Strict = typer.Option(False, "--strict", help="Stop at the first unreadable image or malformed line.")
Workers = typer.Option(2, "--num-workers", min=0, help="DataLoader worker processes for decoding.")
TrustRemoteCode = typer.Option(
    False, "--trust-remote-code", help="Allow transformers to run a hub repo's code."
)


def parse_options(pairs: list[str]) -> dict[str, str]:
    """`--opt key=value` pairs into a dict."""
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--opt expects key=value, got '{pair}'")
        out[key.strip().replace("-", "_")] = value.strip()
    return out
