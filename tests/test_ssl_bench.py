"""benchmarks/ssl.py's protocol pieces: effective rank, the validation hold-out, the selection rule and
the summary of a results file (the pre-training itself is the benchmark's job, not the suite's)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cvfm.data.sources import open_source
from cvfm.methods.byol import BYOLConfig
from cvfm.methods.dino import DINOConfig
from cvfm.methods.dinov2 import DINOv2Config
from cvfm.methods.ibot import IBOTConfig

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "ssl.py"
_spec = importlib.util.spec_from_file_location("ssl_bench", _PATH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_effective_rank_of_a_known_spectrum():
    k, dim = 5, 16
    x = np.zeros((2 * k, dim))
    x[:k, :k], x[k:, :k] = np.eye(k), -np.eye(k)  # covariance: equal variance on k axes, none elsewhere
    rank, top = bench.effective_rank(x)
    assert rank == pytest.approx(k)
    assert top == pytest.approx(1 / k)
    x[:, 0] *= 10  # one axis now holds 100 / 104 of the variance
    rank, top = bench.effective_rank(x)
    assert top == pytest.approx(100 / 104)
    assert 1 < rank < 1.5


def test_first_candidates_are_cvfm_defaults():
    byol = bench.GRID["byol"][0]
    assert float(byol["momentum"]) == BYOLConfig().momentum
    assert float(byol["min_scale"]) == BYOLConfig().min_scale
    for name, config in (("dino", DINOConfig()), ("ibot", IBOTConfig()), ("dinov2", DINOv2Config())):
        first = bench.GRID[name][0]
        assert float(first["momentum_teacher"]) == config.momentum_teacher
        assert tuple(map(float, first["global_scale"].split(","))) == config.global_scale


def _val(cand: dict, knn: float, linear: float, seed: int = 0) -> dict:
    return dict(phase="val", method="byol", candidate=cand, seed=seed, knn_top1=knn, linear_top1=linear)


def test_selection_takes_the_best_validation_sum_and_the_paper_on_a_tie(monkeypatch):
    g = ({"momentum": "0.99"}, {"momentum": "0.999"}, {"momentum": "0.9"}, {"momentum": "0.9999"})
    monkeypatch.setitem(bench.GRID, "byol", g)
    assert bench.select([], "byol")[0] == g[0]  # nothing scored yet: the paper's
    records = [_val(g[0], 80, 80), _val(g[1], 90, 69), _val(g[2], 70, 92), _val(g[3], 85, 70)]
    assert bench.select(records, "byol")[0] == g[2]  # 162 beats 160 and 159, whatever k-NN alone says
    records[0]["linear_top1"] = 82  # 162 too: the earlier candidate wins
    assert bench.select(records, "byol")[0] == g[0]
    records.append(_val(g[2], 70, 60, seed=1))  # the mean over selection seeds counts
    assert bench.select(records, "byol")[0] == g[0]
    # a test-phase run never takes part in the choice
    assert bench.select([{**_val(g[3], 99, 99), "phase": "test"}], "byol")[0] == g[0]


def test_val_split_is_stratified_and_disjoint(tmp_path):
    manifest = bench.write_val_split("builtin:digits", 300, tmp_path / "split")
    train = open_source("builtin:digits", split="train")
    fit, val = open_source(manifest, split="train"), open_source(manifest, split="val")
    assert (len(fit), len(val)) == (len(train) - 300, 300)
    assert not {it.id for it in fit.items} & {it.id for it in val.items}
    counts = np.bincount(val.labels, minlength=10)
    assert counts.min() >= 29 and counts.max() <= 31  # 300 of 10 balanced classes
    ids = [it.id for it in train.items]
    i = ids.index(val.items[0].id)
    assert fit.classes == val.classes == sorted(train.classes)  # a manifest's class names, sorted
    assert val.classes[val.labels[0]] == train.classes[train.labels[i]]
    assert np.array_equal(np.asarray(val.load(0)), np.asarray(train.load(i)))  # the same pixels


def test_skip_validation_tests_the_papers_defaults_and_a_full_run_reuses_them(tmp_path, monkeypatch):
    calls = []

    def fake_run(spec, data, split, workdir, args):
        calls.append(spec)
        paper = spec["candidate"] == bench.GRID.get(spec["method"], ({},))[0]
        return {**spec, "knn_top1": 50.0 + paper, "linear_top1": 50.0, "effective_rank": 1.0}

    monkeypatch.setattr(bench, "run_one", fake_run)
    monkeypatch.setattr(bench, "versions", dict)
    monkeypatch.setattr(bench, "dino_out_dim", lambda args: 1024)
    monkeypatch.setattr(bench, "write_val_split", lambda data, size, folder: "val.jsonl")
    common = ["--model", "cvfm/tiny-vit", "--seeds", "0", "--results", str(tmp_path / "r.jsonl")]

    bench.quality(bench.parse_args([*common, "--skip-validation"]), tmp_path)
    assert {c["phase"] for c in calls} == {"test"}
    tested = {c["method"]: c["candidate"] for c in calls}
    assert tested == {"random init": None, "raw pixels": None} | {
        m: bench.GRID[m][0] for m in bench.FAMILIES[bench.VIT]["methods"]
    }

    calls.clear()  # the full protocol adds the validation runs; the papers' defaults win them here
    bench.quality(bench.parse_args(common), tmp_path)
    assert {c["phase"] for c in calls} == {"val"}
    assert len(calls) == 1 + sum(len(bench.GRID[m]) for m in ("dino", "ibot", "dinov2"))


def _run(phase, method, seed, knn, linear, cand=None, rank=10.0, **config):
    # no "model" / "finetune_epochs": a results file written before --model, read as cvfm/tiny-resnet
    config = {"data": "d", "epochs": 2, "batch_size": 8, "lr": None, "val_size": 10, **config}
    return {
        "config": config,
        "phase": phase,
        "method": method,
        "options": cand or {},
        "candidate": cand,
        "seed": seed,
        "knn_top1": knn,
        "linear_top1": linear,
        "effective_rank": rank,
        "top_direction_share": 0.5,
    }


def test_summarise_prints_means_spreads_and_per_seed_gains(tmp_path, capsys):
    paper, slow = bench.GRID["byol"][0], bench.GRID["byol"][-1]
    records = [_run("val", "byol", 0, 70, 70, paper), _run("val", "byol", 0, 80, 80, slow)]
    for seed, base in ((0, 70.0), (1, 72.0)):
        records.append(_run("test", "random init", seed, base, 60.0))
        records.append(_run("test", "simclr", seed, base + 10 + 2 * seed, 75.0, {}))
        records.append(_run("test", "byol", seed, base + 6, 71.0, slow))
        records.append(_run("test", "byol", seed, base - 1, 64.0, paper))
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"config": {"da')  # a cut-short line
    assert bench.main(["--summarise", str(path)]) == 0
    out = capsys.readouterr().out
    assert "11.00 ± 1.41" in out  # simclr's k-NN gains 10 and 12 over the same seed's random init
    assert "15.00 ± 0.00" in out  # its linear gains
    assert "momentum=0.999 min_scale=0.5" in out and "selected" in out
    assert "byol (momentum=0.999 min_scale=0.5; selected): mean gain k-NN +6.00, linear +11.00" in out
    assert "meets +5 k-NN and +10 linear" in out
    assert "byol (momentum=0.99 min_scale=0.08; paper): mean gain k-NN -1.00, linear +4.00" in out
    assert "misses +5 k-NN and +10 linear" in out
    assert out.count("simclr (-; defaults): mean gain k-NN +11.00") == 1  # one row per setting
    assert "Quality: cvfm/tiny-resnet pre-trained" in out and "fine-tune" not in out


def test_summarise_vit_gives_finetune_gains_either_target_and_the_dino_comparison(tmp_path, capsys):
    vit = {"model": "cvfm/tiny-vit", "finetune_epochs": 3}
    records = []
    for seed, base in ((0, 50.0), (1, 54.0)):
        records.append({**_run("test", "random init", seed, base, 60.0, **vit), "finetune_top1": 40.0})
        records.append({**_run("test", "raw pixels", seed, 90.0, 80.0, **vit)})  # not fine-tuned
        dino, ibot = bench.GRID["dino"][0], bench.GRID["ibot"][0]
        records.append({**_run("test", "dino", seed, base + 6, 61.0, dino, **vit), "finetune_top1": 41.0})
        records.append({**_run("test", "ibot", seed, base + 8, 62.0, ibot, **vit), "finetune_top1": 42.0})
        mae = _run("test", "mae", seed, base + 1, 70.0 + seed, {}, **vit)
        records.append({**mae, "finetune_top1": 50.0 + 2 * seed})
    path = tmp_path / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench.main(["--summarise", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Quality: cvfm/tiny-vit pre-trained" in out and "`cvfm finetune` for 3 epoch(s)" in out
    assert "fine-tune top-1 %" in out and "fine-tune gain" in out
    assert "11.00 ± 1.41" in out  # mae's fine-tune gains 10 and 12 over the same seed's random init
    assert "mae (-; defaults): mean gain k-NN +1.00, linear +10.50, fine-tune +11.00" in out
    assert "meets +5 k-NN or +10 linear" in out  # mae, by its linear gain alone
    # no validation runs: the papers' defaults are reported, and say so
    assert "no validation phase (--skip-validation)" in out and "selected" not in out
    assert (
        "dino (momentum_teacher=0.996 global_scale=0.4,1; paper (not validated)): mean gain k-NN +6.00" in out
    )
    assert "ibot 60.00 against dino 58.00: meets 'iBOT or DINOv2 beats DINO" in out
