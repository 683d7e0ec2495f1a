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
RunWorkers = typer.Option(
    None,
    "--num-workers",
    min=0,
    help="DataLoader worker processes for decoding (default 2; with --resume, the run's). A resumed run "
    "keeps the CPU thread count it started with, so its result does not depend on this.",
)


def pretrained_option(default: bool, note: str = ""):
    """The --pretrained/--random-init choice, defaulting to `default` (each command keeps its own)."""
    return typer.Option(
        default,
        "--pretrained/--random-init",
        help="Load the model's pretrained weights, or initialise it at random (a baseline)." + note,
    )


RunOutput = typer.Option(..., "--output", "-o", help="Run folder (refused if it exists, see --overwrite).")
RunOverwrite = typer.Option(False, "--overwrite", help="Replace an existing run folder.")
# The training loop's options (cvfm pretrain, cvfm segment train)
GradAccum = typer.Option(1, "--grad-accum", min=1, help="Gradient accumulation steps.")
TrainPrecision = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (mixed precision).")
CheckpointEvery = typer.Option(500, "--checkpoint-every", min=1, help="Steps between checkpoints.")
Log = typer.Option(["jsonl"], "--log", help="jsonl (always on), tensorboard, wandb.")
Resume = typer.Option(False, "--resume", help="Continue the run in --output from its last checkpoint.")
Exclude = typer.Option(
    None,
    "--exclude",
    help='A file of ids left out of training: one per line, or a .jsonl file with an "id" per line '
    "('-' reads standard input).",
)
Ledger = typer.Option(
    None, "--ledger", help="A deletion ledger (cvfm unlearn): the ids it has forgotten are left out too."
)
TrustRemoteCode = typer.Option(
    False, "--trust-remote-code", help="Allow transformers to run a hub repo's code."
)

Forget = typer.Option(
    None,
    "--forget",
    help="File of ids to forget: one per line, or .jsonl with an 'id' per line ('-': stdin).",
)
ForgetClass = typer.Option(
    None, "--forget-class", help="Forget every training item of this class (name or index); repeatable."
)
ForgetWhere = typer.Option(
    None,
    "--forget-where",
    help="Forget the items where FIELD=V1,V2 or FIELD!=V (label, id or a .jsonl / hf: field; wildcards); "
    "repeatable, all must hold.",
)


def forget_request(forget: str | None, classes, where, request_id: str | None = None):
    """The ForgetRequest of the --forget / --forget-class / --forget-where options."""
    from cvfm.unlearn.request import ForgetRequest

    return ForgetRequest(
        ids_file=forget, classes=tuple(classes or ()), where=tuple(where or ()), request_id=request_id
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
