"""`cvfm segment export`: Segment Anything from the command line (prompts, automatic masks, training and
export come as subcommands of `cvfm segment`)."""

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
    sam_onnx.json describing the inputs. Needs `pip install cvfm[onnx]`.

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
