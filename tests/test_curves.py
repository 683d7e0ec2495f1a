"""curves.png: which panels a run's metrics make (what a person reads a run by), and the PNG itself."""

from __future__ import annotations

import json

from cvfm.runtime.tracking import Panel, curve_panels, plot_curves


def _dino_like() -> list[dict]:
    """Two epochs of two steps, as the trainer logs them: monitor at step 0, train/ per step, then each
    epoch's means with the epoch number, the speed and the monitor."""
    records = [{"step": 0, "monitor/knn_top1@20": 0.5}]
    for step in (1, 2, 3, 4):
        records.append(
            {
                "step": step,
                "train/loss": 5.0 - 0.1 * step,
                "train/lr": 0.001 / step,
                "train/weight_decay": 0.04,  # constant: no panel
                "train/teacher_entropy": 3.0 + 0.1 * step,
                "train/teacher_entropy_max": 4.85,
                "train/teacher_temp": 0.04,  # constant: no panel
                "train/feature_std": 0.05 * step,
            }
        )
        if step % 2 == 0:
            records.append(
                {
                    "step": step,
                    "epoch/loss": 5.0 - 0.1 * step,
                    "epoch/lr": 0.002 / step,
                    "epoch/weight_decay": 0.04,
                    "epoch/teacher_entropy": 3.0 + 0.1 * step,
                    "epoch/teacher_entropy_max": 4.85,
                    "epoch/teacher_temp": 0.04,
                    "epoch/feature_std": 0.05 * step,
                    "epoch": step // 2,
                    "images_per_s": 100.0 + step,
                    "monitor/knn_top1@20": 0.5 + 0.1 * step,
                }
            )
    return records


def test_panels_group_train_and_epoch_and_drop_constants_and_bookkeeping():
    assert curve_panels(_dino_like()) == [
        Panel("loss", ("train/loss", "epoch/loss")),
        Panel("monitor", ("monitor/knn_top1@20",)),
        Panel("lr", ("train/lr", "epoch/lr")),
        Panel(
            "teacher_entropy",
            ("train/teacher_entropy", "epoch/teacher_entropy"),
            ("train/teacher_entropy_max",),
        ),
        Panel("feature_std", ("train/feature_std", "epoch/feature_std")),
    ]


def test_one_epoch_losses_and_spreads_share_panels_without_copies_and_a_flat_monitor_stays():
    records = [
        {
            "step": s,
            "train/loss": 1.0 / s,
            "train/lm_loss": 1.0 / s,
            "train/itm_loss": 2.0 / s,
            "train/wd": 0.1,
            "train/feature_std": 0.1 * s,
            "train/text_feature_std": 0.2 * s,
        }
        for s in (1, 2, 3)
    ]
    records.append(
        {"step": 3, "epoch/loss": 0.6, "epoch/lm_loss": 0.6, "epoch/itm_loss": 1.2, "epoch/wd": 0.1}
    )
    records += [{"step": 0, "monitor/top1": 0.25}, {"step": 3, "monitor/top1": 0.25}]
    # lm_loss is the loss itself (BLIP's captioner): drawn once; one epoch's mean is a point beside its
    # steps, but a weight decay that never changed has no panel in either phase; CLIP's two towers'
    # feature spreads share a panel.
    assert curve_panels(records) == [
        Panel("loss", ("train/loss", "train/itm_loss", "epoch/loss", "epoch/itm_loss")),
        Panel("monitor", ("monitor/top1",)),
        Panel("feature_std", ("train/feature_std", "train/text_feature_std")),
    ]


def test_png_written_and_nothing_when_nothing_varies(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in _dino_like()))
    png = tmp_path / "curves.png"
    assert plot_curves(metrics, png) == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics.write_text('{"step": 1, "train/lr": 0.1}\n{"step": 2, "train/lr": 0.1, "epoch": 1}\n')
    assert plot_curves(metrics, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
