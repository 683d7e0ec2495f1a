"""`make demo`'s script, end to end at one epoch: it pre-trains, scores the three encoders on the same
protocol and prints their table (the README's main command; its figures come from the full 20 epochs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_script_prints_three_rows_of_scores(tmp_path):
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "EPOCHS": "1",
        "OUT": str(tmp_path / "demo"),
    }
    env |= {"HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(
        ["bash", "examples/demo.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0].split() == ["encoder", "k-NN", "top-1", "linear", "top-1"]
    rows = {line.rsplit(maxsplit=2)[0]: tuple(map(float, line.split()[-2:])) for line in lines[1:]}
    assert list(rows) == ["raw pixels", "random-init cvfm/tiny-resnet", str(tmp_path / "demo")]
    assert all(10 < v <= 100 for scores in rows.values() for v in scores)  # 10 classes: chance is 10
    assert (tmp_path / "demo" / "backbone" / "model.safetensors").exists()
