"""Options shared by several subcommands."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

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

ENGINE_PANEL = "Engine (batch inference on Ray)"
EngineKind = typer.Option(
    "local",
    "--engine",
    help="local (this process; DataLoader workers decode) or ray (decoding as Ray tasks, the model in "
    "actors, one per GPU; pip install 'cvfm\\[ray]'). Same output, same resume.",
    rich_help_panel=ENGINE_PANEL,
)
Address = typer.Option(
    None,
    "--address",
    help="Ray: join this cluster (auto: the one `ray start` runs here; or HOST:PORT). Default: start an "
    "embedded Ray on this machine for the command.",
    rich_help_panel=ENGINE_PANEL,
)
Actors = typer.Option(
    None,
    "--actors",
    min=1,
    help="Ray: model replicas (default: one per GPU of the cluster, else 1).",
    rich_help_panel=ENGINE_PANEL,
)


def engine(kind: str, address: str | None, actors: int | None):
    """The Engine of the --engine / --address / --actors options (a usage error for a bad mix)."""
    from cvfm.runtime.engine import Engine

    return Engine(kind, address, actors)


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


AMG_PANEL = "Automatic mask generator (segment-anything's knobs)"


def _amg(kind: type, default, flag: str, help: str) -> tuple[type, typer.models.OptionInfo]:
    return kind, typer.Option(default, flag, help=help, rich_help_panel=AMG_PANEL)


# `AutoSettings`' fields as options, with the reference defaults (a test checks that they stay equal).
AUTO_OPTIONS = {
    "points_per_side": _amg(int, 32, "--points-per-side", "Grid of point prompts per side."),
    "points_per_batch": _amg(int, 64, "--points-per-batch", "Points decoded together."),
    "pred_iou_thresh": _amg(float, 0.88, "--pred-iou-thresh", "Keep masks predicted this good."),
    "stability_score_thresh": _amg(float, 0.95, "--stability-score-thresh", "Keep masks this stable."),
    "stability_score_offset": _amg(float, 1.0, "--stability-score-offset", "Logit offset of stability."),
    "box_nms_thresh": _amg(float, 0.7, "--box-nms-thresh", "Box IoU above which a duplicate goes."),
    "crop_n_layers": _amg(int, 0, "--crop-n-layers", "Layers of overlapping crops (0: whole image)."),
    "crop_nms_thresh": _amg(float, 0.7, "--crop-nms-thresh", "Box NMS across crops."),
    "crop_overlap_ratio": _amg(float, 512 / 1500, "--crop-overlap-ratio", "Overlap of crops."),
    "crop_n_points_downscale_factor": _amg(
        int, 1, "--crop-n-points-downscale-factor", "Fewer points per side in each deeper crop layer."
    ),
    "min_mask_region_area": _amg(int, 0, "--min-mask-region-area", "Remove islands / holes below."),
}


def with_auto_settings(command: Callable) -> Callable:
    """Give a command the automatic mask generator's options (`AUTO_OPTIONS`); it receives them as one
    `settings` argument, an `AutoSettings`."""
    own = [p for p in inspect.signature(command).parameters.values() if p.name != "settings"]
    kind = inspect.Parameter.KEYWORD_ONLY
    added = [inspect.Parameter(n, kind, default=o, annotation=t) for n, (t, o) in AUTO_OPTIONS.items()]

    @functools.wraps(command)
    def run(**options):
        from cvfm.models.amg import AutoSettings

        settings = AutoSettings(**{name: options.pop(name) for name in AUTO_OPTIONS})
        return command(**options, settings=settings)

    run.__signature__ = inspect.Signature([*own, *added])
    run.__annotations__ = {k: v for k, v in command.__annotations__.items() if k != "settings"}
    return run


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
