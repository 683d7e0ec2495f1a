"""What the subcommands write: one strict JSON line per record (data on stdout, or appended to a file)."""

from __future__ import annotations

import json
import sys


def emit(record: dict, output: str | None = None) -> None:
    """One strict JSON line to stdout, or appended to `output`."""
    line = json.dumps(record, sort_keys=False, allow_nan=False) + "\n"
    if output and output != "-":
        with open(output, "a", encoding="utf-8") as f:
            f.write(line)
    else:
        sys.stdout.write(line)
        sys.stdout.flush()


def emit_run(path, exported: str = "backbone") -> None:
    """The final line of a training command, `{"run": ..., exported: ...}`, written by the main process only
    (one line, also under accelerate launch / torchrun)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        line = {"run": str(path), exported: str(path / exported)}
        if (path / "segmenter").is_dir():  # distill --loss sam-embedding: the student inside a SAM
            line["segmenter"] = str(path / "segmenter")
        emit(line)
