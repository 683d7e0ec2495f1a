"""benchmarks/distill.py's protocol pieces: its configuration from the command line (a run once failed
there), the teacher shared by runs of other distillation settings, and the matched from-scratch budget."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "distill.py"
_spec = importlib.util.spec_from_file_location("distill_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_config_of_the_default_command_line_names_the_dino_options():
    config = bench.config_of(bench.parse_args([]))
    assert config["dino_options"] == {"local_crops": "0"}
    assert config["teacher"] == "cvfm/small-resnet" and config["student"] == "cvfm/tiny-resnet"
    wider = bench.config_of(
        bench.parse_args(["--dino-local-crops", "8", "--opt", "dino.momentum_teacher=0.999"])
    )
    assert wider["dino_options"] == {"local_crops": "8", "momentum_teacher": "0.999"}


def test_a_teacher_is_shared_by_other_distillation_settings_only():
    base = bench.config_of(bench.parse_args([]))
    longer = bench.config_of(bench.parse_args(["--epochs", "50", "--loss", "feature", "--loss", "dino"]))
    assert longer != base and bench.teacher_config(longer) == bench.teacher_config(base)
    other_teacher = bench.config_of(bench.parse_args(["--teacher-epochs", "5"]))
    assert bench.teacher_config(other_teacher) != bench.teacher_config(base)


def test_matched_epochs_fill_the_distillation_wall_time():
    calibration = {"train_s": 60.0, "epoch_s": 50.0}  # 10 s of start-up around one 50 s epoch
    assert bench.matched_epochs(calibration, 210.0) == 4
    assert bench.matched_epochs(calibration, 20.0) == 1  # never below one epoch


def _record(
    config: dict, role: str, knn: float | None = None, train_s: float | None = None, epochs=None
) -> dict:
    record = {
        "config": config,
        "role": role,
        "seed": 0,
        "knn_top1": knn,
        "linear_top1": knn,
        "train_s": train_s,
    }
    return record | ({"epochs": epochs} if epochs else {})


def test_summary_shows_a_shared_teacher_and_flags_a_mismatched_wall_time():
    base = bench.config_of(bench.parse_args([]))
    longer = bench.config_of(bench.parse_args(["--epochs", "50"]))
    records = [
        _record(base, "teacher", 88.0, 1000.0, 20),
        _record(longer, "distilled", 86.0, 600.0, 50),
        _record(longer, "calibration", None, 50.0, 1),
        _record(longer, "from scratch", 80.0, 300.0, 12),  # half the distillation's time: not a fair match
        _record(longer, "random init", 79.0),
    ]
    text = bench.summary(records)
    assert text.count("\nteacher ") == 1 and "distilled 50 epochs" in text
    assert "+6.00 k-NN points (meets >= +3); teacher - distilled: +2.00 (meets <= 3)" in text
    assert "MISMATCHED: from scratch had 0.50x the distillation's time" in text
    records[3]["train_s"] = 590.0
    assert "MISMATCHED" not in bench.summary(records)


def test_a_rerun_reuses_every_finished_run_of_its_configuration(tmp_path, monkeypatch):
    """Nothing trains again when the results file holds the seed's runs (the configs read back as written:
    no keys of the SSL benchmark's legacy configs added)."""
    args = bench.parse_args(["--results", str(tmp_path / "r.jsonl"), "--seeds", "0"])
    config = bench.config_of(args)
    teacher_run = tmp_path / "teacher"
    (teacher_run / "backbone").mkdir(parents=True)
    records = [{**_record(config, "teacher", 88.0, 100.0, 20), "model": str(teacher_run)}]
    records += [_record(config, role, 80.0, 50.0, 1) for role in ("distilled", "from scratch")]
    records.append({**_record(config, "calibration", None, 20.0, 1), "epoch_s": 15.0})
    records += [_record(config, "random init", 79.0), _record(config, "speed")]
    Path(args.results).write_text("".join(json.dumps(r) + "\n" for r in records))

    def train(*_):
        raise AssertionError("a finished run was trained again")

    for name in ("dino", "distilled", "step_speed"):
        monkeypatch.setattr(bench, name, train)
    assert len(bench.benchmark(args, tmp_path / "work")) == len(records)
