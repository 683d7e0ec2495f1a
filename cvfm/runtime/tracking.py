"""Metrics logging through Accelerate's tracker interface: metrics.jsonl always, TensorBoard / W&B on request,
and a PNG of the training curves."""

from __future__ import annotations

import json
import math
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


def plot_curves(metrics_path: Path, out: Path) -> Path | None:
    """Plot every logged series against the step, one panel per metric."""
    records = read_metrics(metrics_path)
    keys = sorted({k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 50 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.tight_layout()
    atomic_write(out, lambda p: fig.savefig(p, format="png", dpi=90))
    plt.close(fig)
    return out
