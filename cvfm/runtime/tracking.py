"""Metrics logging through Accelerate's tracker interface: metrics.jsonl always, TensorBoard / W&B on request,
and a PNG of the training curves."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from accelerate.tracking import GeneralTracker

from cvfm.runtime.files import atomic_write


class JsonlTracker(GeneralTracker):
    """Appends one JSON object per `log` call to metrics.jsonl (works offline, greps well)."""

    name = "jsonl"
    requires_logging_directory = False

    def __init__(self, path: str | Path):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        pass  # the resolved configuration lives in run.json

    def log(self, values: dict, step: int | None = None, **kwargs):
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def _plain(v):
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, after_step: int, epochs_done: int) -> None:
    """On resume, forget records logged after the checkpoint we restart from: those of later steps, and
    the summaries (records with an "epoch") of epochs after the first `epochs_done`."""
    kept = [
        r
        for r in read_metrics(path)
        if (r.get("step") or 0) <= after_step and r.get("epoch", 0) <= epochs_done
    ]
    atomic_write(path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept)))


BOOKKEEPING = ("step", "epoch", "images_per_s")  # logged, but not what a run is read by
PHASES = ("train/", "epoch/")  # each step's value and the epoch's mean of one quantity: drawn together
MONITOR = "monitor/"
SHARED = ("loss", "feature_std")  # quantities ending so share a panel: every loss; both towers' spread


@dataclass(frozen=True)
class Panel:
    """One plot of curves.png: `series` drawn as lines against the step, `references` (bounds) dashed."""

    title: str
    series: tuple[str, ...]
    references: tuple[str, ...] = ()


def curve_panels(records: list[dict]) -> list[Panel]:
    """The panels of curves.png: the losses together first, then the monitor's scores, then one panel per
    other quantity (learning rate, schedules, collapse signals; the `*feature_std` together) in the order
    first logged, its `train/` and `epoch/` series on the same axes. Constant quantities and copies of
    another series are left out (the monitor's scores are kept even when flat); a `<name>_max` is a dashed
    reference on `<name>`'s panel."""
    keys = dict.fromkeys(k for r in records for k, v in r.items() if k not in BOOKKEEPING and _number(v))
    seen: dict[str, set] = {}  # quantity -> every value it took, in either phase
    for key in keys:
        seen.setdefault(_quantity(key), set()).update(v for _, v in _points(records, key))
    series: dict[str, list[str]] = {}  # panel title -> keys
    references: dict[str, dict[str, str]] = {}  # panel title -> {quantity: its first key}
    for key in keys:
        name = _quantity(key)
        if name.endswith("_max"):
            references.setdefault(name.removesuffix("_max"), {}).setdefault(name, key)
            continue
        panel, values = series.setdefault(_panel_of(key), []), _points(records, key)
        flat = len(seen[name]) < 2 and not key.startswith(MONITOR)
        if not flat and all(_points(records, k) != values for k in panel):
            panel.append(key)
    order = sorted(series, key=lambda title: (title != "loss", title != "monitor"))  # stable otherwise
    return [Panel(t, tuple(series[t]), tuple(references.get(t, {}).values())) for t in order if series[t]]


def _quantity(key: str) -> str:
    """`train/lr` and `epoch/lr` are the learning rate: `lr`."""
    return next((key.removeprefix(p) for p in PHASES if key.startswith(p)), key)


def _panel_of(key: str) -> str:
    if key.startswith(MONITOR):
        return "monitor"
    name = _quantity(key)
    return next((shared for shared in SHARED if name.endswith(shared)), name)


def plot_curves(metrics_path: Path, output: Path) -> Path | None:
    """Draw the `curve_panels` of a run's metrics.jsonl to `output` (a PNG); None when nothing varies."""
    records = read_metrics(metrics_path)
    panels = curve_panels(records)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        colours: dict[str, str] = {}  # one colour per quantity: its train/ and epoch/ series share it
        for key in panel.series:
            steps, values = zip(*_points(records, key), strict=True)
            colour = colours.setdefault(_quantity(key), f"C{len(colours)}")
            style = {"lw": 0.8, "alpha": 0.5} if key.startswith("train/") else {"lw": 1.5, "marker": "."}
            ax.plot(steps, values, color=colour, label=key, **style)
        for key in panel.references:
            steps, values = zip(*_points(records, key), strict=True)
            ax.plot(steps, values, "--", color="grey", lw=1, label=_quantity(key))
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(output, lambda p: fig.savefig(p, format="png", dpi=90))
    plt.close(fig)
    return output


def _points(records: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in records if _number(r.get(key))]


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)
