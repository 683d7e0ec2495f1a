"""The real CLI under torchrun, 2 CPU processes (gloo): 2 processes x B train what 1 process x 2B does
(DINO with multi-crop, BatchNorm in the backbone and head, its all-reduced centre; `unlearn --method
retrain`), without DDP's gradient-layout warning, and a run stopped by SIGTERM resumes exactly.

The images are random noise: on the digits' flat background 5.6% of the stem's max-pool windows hold a
tied maximum, which float rounding breaks either way, sending the gradient elsewhere; two runs then drift
apart within a few steps even on one process when only its thread count changes (none tie on noise)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from cvfm.finetune import FinetuneConfig, finetune
from cvfm.registry import create_classifier, create_encoder

ROOT = Path(__file__).resolve().parents[1]
DDP_COPY_WARNING = "Grad strides do not match bucket view strides"


def _command(args: list, processes: int) -> list[str]:
    """`python -m cvfm ARGS`, under torchrun for several processes (--standalone: it picks a free port)."""
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    return [*launcher, "-m", "cvfm", *map(str, args)]


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    # One torch thread per process whatever the launcher: the same float reduction order in every run.
    return {
        **os.environ,
        "PYTHONPATH": path,
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "OMP_NUM_THREADS": "1",
    }


def _cvfm(*args, processes: int = 1, code: int = 0) -> subprocess.CompletedProcess:
    p = subprocess.run(
        _command(list(args), processes), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600
    )
    assert p.returncode == code, p.stderr[-3000:]
    return p


def _run_json(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def _losses(folder: Path) -> list[float]:
    lines = (json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines())
    return [d["train/loss"] for d in lines if "train/loss" in d]


def _relative_change(a: dict, b: dict, start: dict, keys) -> float:
    """|a - b| / |a - start| over `keys` as one vector: how far apart two runs end up, as a fraction of
    how far training moved the weights."""
    apart = sum(float((a[k] - b[k]).double().square().sum()) for k in keys)
    moved = sum(float((a[k] - start[k]).double().square().sum()) for k in keys)
    return (apart / moved) ** 0.5


@pytest.fixture(scope="module")
def noise(tmp_path_factory) -> Path:
    """4 classes of 16 px random RGB noise: train/<class>/ (4 x 32) and test/<class>/ (4 x 8)."""
    root = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c", "d"):
        for i in range(40):
            path = root / ("train" if i < 32 else "test") / name / f"{i:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return root


def _dino(data: Path, out: Path, batch_size: int) -> list:
    return [
        "pretrain",
        *("--data", data, "--split", "train", "--method", "dino", "--opt", "local_crops=2"),
        *("--epochs", "1", "--batch-size", batch_size, "--num-workers", "0", "--checkpoint-every", "1"),
        *("-o", out),
    ]


@pytest.fixture(scope="module")
def dino_runs(noise, tmp_path_factory) -> dict:
    """DINO on the 128 training images for one epoch (4 steps of 32): 2 processes x 16 and 1 x 32."""
    root = tmp_path_factory.mktemp("torchrun_dino")
    two = _cvfm(*_dino(noise, root / "two", 16), processes=2)
    _cvfm(*_dino(noise, root / "one", 32))
    return {"two": root / "two", "one": root / "one", "stderr": two.stderr}


@pytest.mark.slow  # ~40 s; test_embed's torchrun test and test_distributed stay in the default run
def test_dino_on_two_processes_trains_what_one_process_does(dino_runs):
    two, one = dino_runs["two"], dino_runs["one"]
    # Both processes ran, each on its half of the global batch, with the same step plan and lr.
    r2, r1 = _run_json(two), _run_json(one)
    assert r2["resolved"]["num_processes"] == 2 and r1["resolved"]["num_processes"] == 1
    assert r2["config"]["batch_size"] == 16 and r1["config"]["batch_size"] == 32
    for key in ("global_batch_size", "steps_per_epoch", "total_steps", "lr"):
        assert r2["resolved"][key] == r1["resolved"][key], key
    assert r2["resolved"]["global_batch_size"] == 32 and r2["step"] == r1["step"] == 4
    assert r2["status"] == r1["status"] == "finished"
    # Conv weights are NHWC like their input, so DDP's gradient buckets take the gradients as they are.
    assert DDP_COPY_WARNING not in dino_runs["stderr"]

    # Measured differences below: this run | one process with 2 torch threads instead of 1 | BatchNorm
    # per process (as before GlobalBatchNorm: torch's SyncBatchNorm cannot run on CPUs).
    # The loss of the global batch, step by step: 1.4e-5 | 1.4e-5 | 3.6e-3.
    np.testing.assert_allclose(_losses(two), _losses(one), rtol=1e-3)
    last = "checkpoints/step-00000004/model.safetensors"
    a, b = load_file(two / last), load_file(one / last)
    torch.manual_seed(0)  # the trainer's initialisation
    initial = create_encoder("cvfm/tiny-resnet").model.state_dict()
    start = {f"encoder.model.{k}": v for k, v in initial.items()}
    weights = [k for k in start if k.endswith(("weight", "bias"))]
    statistics = [k for k in start if k.endswith(("running_mean", "running_var"))]
    # Only float rounding differs (the order of the gradient all-reduce and of the BatchNorm sums), but
    # Adam turns near-zero gradients (channels a ReLU shuts) into full steps either way, so the weights
    # end 0.035 | 0.035 | 1.0 of the change training made apart, the BatchNorm statistics 1.2e-3 |
    # 1.2e-3 | 0.053.
    assert _relative_change(a, b, start, weights) < 0.2
    assert _relative_change(a, b, start, statistics) < 0.01
    # The teacher's centre, the all-reduced mean of both processes' teacher outputs: 4.4e-6 | 4.5e-6 |
    # 0.043 of its largest entry.
    center = float((a["center"] - b["center"]).abs().max() / b["center"].abs().max())
    assert center < 1e-3


@pytest.mark.slow  # shares the 2-process DINO runs above
def test_the_two_process_backbone_is_plain_timm(dino_runs):
    folder = dino_runs["two"] / "backbone"
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is torch.nn.BatchNorm2d for m in norms)
    encoder = create_encoder(str(dino_runs["two"])).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), encoder(x), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_and_a_two_process_resume_ends_the_same(dino_runs, noise, tmp_path):
    """SIGTERM to one of the two processes (as `kill <pid>`; the launcher sends it to both): both stop
    after the same step and checkpoint it (before, the other one trained on and both hung)."""
    out = tmp_path / "stopped"
    p = subprocess.Popen(
        _command(_dino(noise, out, 16), processes=2),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=ROOT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step-00000001").exists():
            assert p.poll() is None and time.monotonic() < deadline, p.communicate()[1][-3000:]
            time.sleep(0.05)
        worker = [c for c in psutil.Process(p.pid).children() if c.environ().get("RANK") == "1"]
        worker[0].send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    stopped = _run_json(out)
    assert stopped["status"] == "interrupted", err[-3000:]
    assert 1 <= stopped["step"] < 4
    assert (out / "checkpoints" / f"step-{stopped['step']:08d}").is_dir()

    # --batch-size is per process: one process would change the global batch half-way.
    assert "it was trained by 2" in _cvfm("pretrain", "-o", out, "--resume", code=2).stderr
    _cvfm("pretrain", "-o", out, "--resume", "--num-workers", "0", processes=2)
    resumed = _run_json(out)
    assert resumed["status"] == "finished" and resumed["step"] == 4
    assert resumed["resolved"]["num_processes"] == 2
    a = load_file(out / "checkpoints/step-00000004/model.safetensors")
    b = load_file(dino_runs["two"] / "checkpoints/step-00000004/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # bit for bit: same processes, threads and reduction order as the uninterrupted run
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_unlearn_retrain_on_two_processes_equals_one_process(noise, tmp_path):
    """`--batch-size` is per process: the retrain keeps the original's global batch (32) on any number
    of processes, so retraining on 2 processes x 16 gives what 1 process x 32 gives."""
    cfg = FinetuneConfig(data=str(noise), epochs=2, batch_size=32, num_workers=0, output=str(tmp_path / "ft"))
    original = finetune(cfg)
    ids = [f"b/{i:02d}.png" for i in range(5)]
    (tmp_path / "erase.txt").write_text("\n".join(ids) + "\n")
    common = ["unlearn", "--model", original, "--forget", tmp_path / "erase.txt", "--num-workers", "0"]
    two = _cvfm(*common, "-o", tmp_path / "two", processes=2)
    _cvfm(*common, "--no-audit", "-o", tmp_path / "one")

    record = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(record) == 1, two.stdout  # one process writes the record, audits and prints
    assert record[0]["method"] == "retrain" and record[0]["guarantee"] == "exact"
    assert record[0]["settings"]["batch_size"] == 16 and "ua" in record[0]["audit"]["after"]
    assert not (tmp_path / ".two.forget-ids").exists()  # the staged ids are cleaned up
    r2, r1 = _run_json(tmp_path / "two"), _run_json(tmp_path / "one")
    assert r2["resolved"]["num_processes"] == 2 and r1["resolved"]["num_processes"] == 1
    assert r2["config"]["batch_size"] == 16 and r1["config"]["batch_size"] == 32
    assert r2["resolved"]["global_batch_size"] == r1["resolved"]["global_batch_size"] == 32
    assert r2["resolved"]["lr"] == r1["resolved"]["lr"] and r2["step"] == r1["step"] == 6
    # The output's recipe holds the batch it was retrained with: a later retrain keeps 32 too.
    assert r2["finetune"]["batch_size"] == 16
    assert DDP_COPY_WARNING not in two.stderr

    a = create_classifier(str(tmp_path / "two")).state_dict()
    b = create_classifier(str(tmp_path / "one")).state_dict()
    assert a.keys() == b.keys()
    for k in a:  # SGD keeps float rounding small: measured 4e-6 of each tensor's norm
        assert float((a[k] - b[k]).double().norm()) <= 1e-4 * float(b[k].double().norm()), k


def test_retrain_shares_the_original_global_batch_among_its_processes(tmp_path):
    from cvfm.errors import UsageError
    from cvfm.unlearn.run import _same_global_batch

    model = tmp_path / "clf"
    model.mkdir()
    (model / "run.json").write_text(json.dumps({"resolved": {"num_processes": 2}}))
    recipe = FinetuneConfig(data="d", output=str(model), batch_size=6)
    assert _same_global_batch(recipe, str(model), world=1).batch_size == 12
    assert _same_global_batch(recipe, str(model), world=4).batch_size == 3
    with pytest.raises(UsageError, match="global batch of 12 images; 5 processes cannot share it"):
        _same_global_batch(recipe, str(model), world=5)
    frozen = FinetuneConfig(data="d", output=str(model), batch_size=6, freeze=True)
    assert _same_global_batch(frozen, str(model), world=5).batch_size == 6  # fitted on one process


@pytest.mark.slow
def test_segment_train_on_two_processes_with_boxes_only(tmp_path):
    """SAM training under DDP: a step with no point prompt leaves the point embeddings out of the loss,
    which DDP (without find_unused_parameters) refuses unless every trainable parameter joins the graph."""
    from cvfm.data.coco import write_coco
    from cvfm.data.masks_source import open_masks
    from cvfm.data.sources import subset

    write_coco(subset(open_masks("builtin:animal-scenes", split="test"), range(8)), tmp_path / "coco")
    args = ["segment", "train", "--model", "cvfm/tiny-sam", "--data", tmp_path / "coco" / "annotations.json"]
    args += ["--epochs", "1", "--batch-size", "2", "--num-workers", "0", "-o", tmp_path / "run"]
    _cvfm(*args, "--opt", "box_share=1", "--opt", "clicks=0", "--opt", "refine=0", processes=2)
    run = _run_json(tmp_path / "run")
    assert run["status"] == "finished" and run["resolved"]["num_processes"] == 2 and run["step"] == 2
    assert (tmp_path / "run" / "backbone" / "model.safetensors").is_file()
