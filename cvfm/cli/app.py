"""The `cvfm` command: a thin Typer layer over the library. Data goes to stdout, logs to stderr.

Exit status: 0 done (also when the reader of stdout stopped early, as in `cvfm ... -o - | head -1`),
1 runtime failure, 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import os
import signal
import stat
import sys

import typer
from typer.core import TyperGroup

import cvfm
from cvfm.errors import CvfmError


class _Group(TyperGroup):
    """The root group: a reader of stdout that stops early ends the command quietly, with status 0.
    (Click would exit 1: it turns every broken pipe into a failure.)"""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            if not _stdout_is_pipe():
                raise  # some other pipe broke: a failure
            # The interpreter flushes stdout once more on exit: let that write go nowhere.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None


def _stdout_is_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (OSError, ValueError):  # no file descriptor (captured output)
        return False


app = typer.Typer(
    name="cvfm",
    cls=_Group,
    help="Computer-vision foundation models from the command line: pre-train, distill, fine-tune, unlearn, "
    "embed, caption, segment, curate, evaluate.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cvfm {cvfm.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """cvfm: one registry, one runtime, composable subcommands."""


_registered = False


def _register() -> None:
    """Attach the subcommands (once; importing this module already does it)."""
    global _registered
    if _registered:
        return
    from cvfm.cli import (
        capfilt,
        caption,
        curate,
        distill,
        embed,
        evaluate,
        finetune,
        models,
        pretrain,
        segment,
        unlearn,
    )

    for module in (models, pretrain, distill, finetune, embed, caption, capfilt, segment, unlearn):
        module.register(app)
    app.add_typer(evaluate.app, name="evaluate")
    app.add_typer(curate.app, name="curate")
    _registered = True


def _terminate(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM (a killed or pre-empted job) checkpoints like Ctrl-C


PIPED_HELP_WIDTH = 160  # columns of --help when not on a terminal, where rich would fold it at 80


def _widen_help_when_piped() -> None:
    """Help read through a pipe or in a CI log keeps its lines (docstrings are written at 110 columns, and
    an option's help fits on one line); COLUMNS or TERMINAL_WIDTH, when set, still decide."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS") or os.environ.get("TERMINAL_WIDTH"):
        return
    from typer import rich_utils

    rich_utils.MAX_WIDTH = PIPED_HELP_WIDTH


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    _widen_help_when_piped()
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    try:
        app()
    except CvfmError as e:
        typer.echo(f"cvfm: error: {e}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("cvfm: interrupted", err=True)
        sys.exit(130)


_register()
