"""A picture of forgetting: per-example loss distributions of the forget, retain and test sets, before and
after unlearning (and for the retrained reference), the view a loss-threshold attack has of the model.

Before unlearning the forget set sits with retain at low loss; forgotten well, it moves over to test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cvfm.runtime.files import atomic_write

SETS = {  # set -> (legend label, colour, line style)
    "forget": ("forget", "tab:red", "-"),
    "retain": ("retain", "tab:blue", "-"),
    "test": ("test", "tab:green", "-"),
    "forget_test": ("test, forgotten classes", "tab:orange", "--"),
}
LOSS_FLOOR = 1e-7  # float32 cross-entropy of a near-certain prediction reaches 0; a log axis needs > 0
BINS = 40


def plot_attack_scores(path: str | Path, *, after, before=None, reference=None) -> Path:
    """Write a PNG with one panel per audit given (before, after, reference): histograms of the
    per-example loss of each set on shared log-spaced bins, each set normalised to a share of 1.

    Each audit is a `cvfm.unlearn.audit.Audit` (metrics with `.scores`). Written atomically."""
    from matplotlib.figure import Figure

    panels = [
        (title, a)
        for title, a in (
            ("before (original)", before),
            ("after (unlearned)", after),
            ("retrained reference", reference),
        )
        if a is not None
    ]
    bins = _shared_bins([s["loss"] for _, a in panels for s in a.scores.values()])
    fig = Figure(figsize=(4.6 * len(panels), 3.6))
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    for ax, (title, a) in zip(axes, panels, strict=True):
        for name, (label, colour, style) in SETS.items():
            if name not in a.scores:
                continue
            loss = np.clip(np.asarray(a.scores[name]["loss"], np.float64), bins[0], bins[-1])
            weights = np.full(len(loss), 1.0 / max(len(loss), 1))
            ax.hist(
                loss,
                bins=bins,
                weights=weights,
                histtype="step",
                color=colour,
                linestyle=style,
                linewidth=1.6,
                label=f"{label} (n={len(loss)})",
            )
        ax.set_xscale("log")
        ax.set_title(
            f"{title}\nUA {_pct(a.get('ua'))}, MIA-efficacy {_pct(a.get('mia_efficacy'))}", fontsize=9
        )
        ax.set_xlabel("per-example cross-entropy loss (log scale)", fontsize=8)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("share of the set", fontsize=8)
    fig.suptitle("Loss-threshold attack view: low loss looks like a training member", fontsize=10)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))


def _shared_bins(losses: list[np.ndarray]) -> np.ndarray:
    """Log-spaced bin edges covering every loss (floored at LOSS_FLOOR)."""
    values = np.concatenate([np.asarray(v, np.float64).ravel() for v in losses] or [np.ones(1)])
    values = values[np.isfinite(values)]
    lo = max(float(values.min()) if len(values) else 1.0, LOSS_FLOOR)
    hi = max(float(values.max()) if len(values) else 1.0, lo * 10)
    return np.geomspace(lo, hi, BINS + 1)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * float(value):.1f}%"
