"""Prompts for `cvfm segment prompt`: from flags (`--point x,y[,label]`, `--box x0,y0,x1,y1`) or from a JSONL
file with one prompt per line for many images.

A prompt is the points and at most one box that SAM turns into one mask (or 3 with multimask). From flags,
every `--point` goes into one prompt, with the box when there is one; several boxes and no points make one
prompt per box. A prompts file holds lines such as
  {"image": "photos/cat.jpg", "points": [[120, 80], [60, 40]], "labels": [1, 0]}
  {"image": "photos/cat.jpg", "box": [10, 12, 200, 180]}
where `image` is a path (relative to the file's folder) or, with `--data`, an id of that data; `labels`
default to 1 (foreground). Coordinates are pixels of the original image, x then y.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from cvfm.data.text import read_lines
from cvfm.errors import UsageError


@dataclass(frozen=True)
class Prompt:
    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None
    multimask: bool | None = field(default=None, compare=False)  # None: SAM's rule (one point: 3 masks)

    def __post_init__(self):
        if not self.points and self.box is None:
            raise UsageError("a prompt needs points or a box")
        if len(self.labels) != len(self.points):
            raise UsageError(f"{len(self.points)} points but {len(self.labels)} labels")
        if any(v not in (0, 1) for v in self.labels):
            raise UsageError(f"point labels are 1 (foreground) or 0 (background), not {list(self.labels)}")
        if self.box is not None and (self.box[2] < self.box[0] or self.box[3] < self.box[1]):
            raise UsageError(f"box {list(self.box)} is not x0,y0,x1,y1 with x0 <= x1 and y0 <= y1")

    def wants_multimask(self) -> bool:
        """SAM's default: 3 masks for an ambiguous prompt (one point alone), else one."""
        return self.multimask if self.multimask is not None else (len(self.points) == 1 and self.box is None)

    def as_dict(self) -> dict:
        out: dict = {}
        if self.points:
            out["points"] = [list(p) for p in self.points]
            out["labels"] = list(self.labels)
        if self.box is not None:
            out["box"] = list(self.box)
        return out


def parse_point(text: str) -> tuple[float, float, int]:
    """ "x,y" or "x,y,label" (label 1 foreground, 0 background)."""
    values = _numbers(text, "--point", (2, 3), "x,y[,label]")
    label = int(values[2]) if len(values) == 3 else 1
    return values[0], values[1], label


def parse_box(text: str) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = _numbers(text, "--box", (4,), "x0,y0,x1,y1")
    return x0, y0, x1, y1


def flag_prompts(points: list[str], boxes: list[str], multimask: bool | None) -> list[Prompt]:
    """The prompts the flags describe (see the module docstring)."""
    parsed = [parse_point(p) for p in points]
    coords = tuple((x, y) for x, y, _ in parsed)
    labels = tuple(lab for _, _, lab in parsed)
    frames = [parse_box(b) for b in boxes]
    if coords and len(frames) > 1:
        raise UsageError("points go with at most one --box; give several boxes without points")
    if coords:
        return [Prompt(coords, labels, frames[0] if frames else None, multimask)]
    return [Prompt(box=b, multimask=multimask) for b in frames]


def read_prompts(path: str | Path, multimask: bool | None) -> list[tuple[str, Prompt]]:
    """(image, prompt) for every line of a prompts file, in order."""
    out = []
    for lineno, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UsageError(f"{where}: not a JSON object ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise UsageError(f'{where}: each line needs "image" (a path or an id) and points or a box')
        try:
            points = tuple((float(x), float(y)) for x, y in record.get("points", []))
            labels = tuple(int(v) for v in record.get("labels", [1] * len(points)))
            box = record.get("box")
            box = None if box is None else tuple(float(v) for v in box)
            if box is not None and len(box) != 4:
                raise ValueError("box needs 4 numbers")
            out.append((record["image"], Prompt(points, labels, box, multimask)))
        except UsageError as e:
            raise UsageError(f"{where}: {e}") from None
        except (TypeError, ValueError) as e:
            raise UsageError(f"{where}: {e}") from None
    if not out:
        raise UsageError(f"'{path}' holds no prompts")
    return out


def _numbers(text: str, flag: str, counts: tuple[int, ...], form: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts:
        raise UsageError(f"{flag} takes {form}, not '{text}'")
    return values
