"""Resume the way a user does: a `cvfm` process is killed (SIGKILL, or SIGTERM) after a checkpoint or a
written part, a NEW process continues it (`--resume` for the training commands, the same command for
embed, caption and capfilt), and the result equals an uninterrupted process's, bit for bit.

Every test first checks that its signal really interrupted the run (the exit status, and an incomplete
output), so none can pass because the kill came too late. The processes run on two CPUs (or fewer), so
the default `--num-workers 2` leaves torch one thread and `--num-workers 0` two, on any machine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cvfm.runtime.checkpoint import read_latest_checkpoint, save_checkpoint
from cvfm.runtime.threads import use_threads

ROOT = Path(__file__).resolve().parents[1]
# 128 training digits in batches of 32: 4 steps an epoch, 8 in all; checkpoints at steps 2, 4, 6 and 8.
PRETRAIN = ["--split", "train", "--method", "simclr", "--epochs", "2", "--batch-size", "32", "--seed", "3"]
PRETRAIN += ["--checkpoint-every", "2"]
FINETUNE = ["--split", "train", "--epochs", "2", "--batch-size", "32", "--seed", "3"]  # checkpoints: epochs


def _two_cpus() -> None:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2])


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}


def _command(args) -> dict:
    return dict(
        args=[sys.executable, "-m", "cvfm", *map(str, args)], cwd=ROOT, env=_env(), preexec_fn=_two_cpus
    )


def cvfm(*args) -> str:
    """Run `cvfm ARGS` to the end in a new process; returns its stderr."""
    p = subprocess.run(**_command(args), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr
    return p.stderr


def interrupt(args, ready: Callable[[], bool], sig: signal.Signals, log: Path) -> str:
    """Start `cvfm ARGS`, send it `sig` as soon as `ready()`, and check that the signal stopped it: killed
    (SIGKILL), or exit status 130 after its clean stop (SIGTERM). Returns its stderr."""
    with open(log, "w+b") as err:
        proc = subprocess.Popen(**_command(args), stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 900
        while not ready():
            assert proc.poll() is None, f"it ended before the signal: {log.read_text()}"
            assert time.monotonic() < deadline, "timed out waiting for the moment to interrupt"
            time.sleep(0.01)
        proc.send_signal(sig)
        proc.wait(timeout=300)
    text = log.read_text()
    assert proc.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 130), text
    return text


def _metrics(run: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock speed."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def _same_tensors(a: Path, b: Path) -> None:
    ta, tb = load_file(a), load_file(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs: max {(ta[k] - tb[k]).abs().max().item():.3g}"


def _status(run: Path) -> str:
    return json.loads((run / "run.json").read_text())["status"]


def _resumed_at(err: str, run: Path) -> int:
    """The step a resumed run says it continued from (its log line)."""
    line = next(x for x in err.splitlines() if x.startswith(f"resuming {run} at step"))
    return int(line.split(" at step ")[1].split("/")[0])


def _checkpoint(run: Path, step: int) -> Callable[[], bool]:
    return lambda: (run / "checkpoints" / f"step-{step:08d}").is_dir()


# ------------------------------------------------------------------------------ checkpoints, threads


def _save_two(folder: Path) -> list[Path]:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return [save_checkpoint(folder, s, model, optimizer, None, {"epoch": 0}) for s in (1, 2)]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


TORN = {
    "weights truncated": lambda c: _truncate(c / "model.safetensors"),
    "weights missing": lambda c: (c / "model.safetensors").unlink(),
    "optimizer truncated": lambda c: _truncate(c / "optimizer.pt"),
    "state missing": lambda c: (c / "state.json").unlink(),
    "state not JSON": lambda c: (c / "state.json").write_text('{"step": 2, "ep'),
    "state empty": lambda c: (c / "state.json").write_text(""),
}


@pytest.mark.parametrize("tear", TORN.values(), ids=TORN.keys())
def test_a_torn_checkpoint_is_skipped_for_the_one_before(tear, tmp_path, capsys):
    first, second = _save_two(tmp_path)
    tear(second)
    path, parts = read_latest_checkpoint(tmp_path)
    assert path == first and parts["state"]["step"] == 1
    assert f"warning: skipping checkpoint {second}" in capsys.readouterr().err
    tear(first)
    assert read_latest_checkpoint(tmp_path) is None


def test_a_resumed_run_keeps_its_thread_count_and_warns_when_omp_overrides_it(monkeypatch, capsys):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(1)
        assert use_threads(2, "run 'r'") == 2 and torch.get_num_threads() == 2
        assert capsys.readouterr().err == ""
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert use_threads(2, "run 'r'") == 1 and torch.get_num_threads() == 1
        err = capsys.readouterr().err
        assert "run 'r' started on 2 CPU thread(s) and OMP_NUM_THREADS gives 1" in err
        assert "may differ" in err
    finally:
        torch.set_num_threads(before)


# -------------------------------------------------------------------------------------------- pretrain


@pytest.fixture(scope="module")
def pretrained(digit_folder, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted runs: with the default --num-workers (one torch thread) and with 0 (two)."""
    root = tmp_path_factory.mktemp("pretrain")
    cvfm("pretrain", "--data", digit_folder, *PRETRAIN, "-o", root / "default")
    cvfm("pretrain", "--data", digit_folder, *PRETRAIN, "--num-workers", "0", "-o", root / "w0")
    return {"default": root / "default", "w0": root / "w0"}


def test_pretrain_killed_resumes_exactly_and_skips_a_torn_checkpoint(pretrained, digit_folder, tmp_path):
    """SIGKILL after the step-4 checkpoint (default workers); the newest checkpoint is then torn (its
    weights cut in half): the new process skips it, continues from the one before, ends the same."""
    full, part = pretrained["default"], tmp_path / "part"
    args = ["pretrain", "--data", digit_folder, *PRETRAIN, "-o", part]
    interrupt(args, _checkpoint(part, 4), signal.SIGKILL, tmp_path / "killed.log")
    assert not (part / "backbone").exists() and _status(part) == "running"
    steps = sorted(int(p.name.split("-")[1]) for p in (part / "checkpoints").glob("step-*"))
    assert len(steps) == 2 and 4 in steps and steps[-1] < 8, steps
    weights = part / "checkpoints" / f"step-{steps[-1]:08d}" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    err = cvfm("pretrain", "-o", part, "--resume")
    assert f"skipping checkpoint {weights.parent}" in err
    assert _resumed_at(err, part) == steps[0]
    _same_tensors(full / "backbone" / "model.safetensors", part / "backbone" / "model.safetensors")
    assert _metrics(part) == _metrics(full)  # every step and epoch record, epoch/* means included
    assert _status(part) == "finished"


@pytest.mark.slow
def test_pretrain_sigterm_mid_epoch_resumes_exactly_with_the_run_threads(pretrained, digit_folder, tmp_path):
    """Started with --num-workers 0 (two torch threads), stopped by SIGTERM mid-epoch, resumed without
    --num-workers: the run keeps its thread count, and its epoch/* records cover the whole epoch."""
    full, part = pretrained["w0"], tmp_path / "part"
    args = ["pretrain", "--data", digit_folder, *PRETRAIN, "--num-workers", "0", "-o", part]
    err = interrupt(args, _checkpoint(part, 2), signal.SIGTERM, tmp_path / "stopped.log")
    assert "stopping after this step" in err and _status(part) == "interrupted"
    assert not (part / "backbone").exists()
    stopped = max(int(p.name.split("-")[1]) for p in (part / "checkpoints").glob("step-*"))
    assert 2 <= stopped < 8

    err = cvfm("pretrain", "-o", part, "--resume")
    assert _resumed_at(err, part) == stopped
    _same_tensors(full / "backbone" / "model.safetensors", part / "backbone" / "model.safetensors")
    epochs = [r for r in _metrics(part) if "epoch/loss" in r]
    assert len(epochs) == 2 and epochs == [r for r in _metrics(full) if "epoch/loss" in r]
    assert _metrics(part) == _metrics(full)
    threads = json.loads((part / "run.json").read_text())["resolved"]["cpu_threads"]
    assert threads == min(2, len(os.sched_getaffinity(0)))  # the 2 CPUs: none left to decoding workers


def _killed_at_step_2_resumes_exactly(args: list, tmp_path: Path) -> Path:
    """Run `cvfm ARGS` (8 steps, checkpoints every 2) to the end, and again killed after its step-2
    checkpoint and resumed in a new process: the same export, last checkpoint and metrics. Returns the
    uninterrupted run."""
    full, part = tmp_path / "full", tmp_path / "part"
    cvfm(*args, "-o", full)
    interrupt([*args, "-o", part], _checkpoint(part, 2), signal.SIGKILL, tmp_path / "killed.log")
    assert not (part / "backbone").exists() and _status(part) == "running"

    err = cvfm(args[0], "-o", part, "--resume")
    assert 2 <= _resumed_at(err, part) < 8
    _same_tensors(full / "backbone" / "model.safetensors", part / "backbone" / "model.safetensors")
    _same_tensors(full / LAST, part / LAST)
    assert _metrics(part) == _metrics(full) and _status(part) == "finished"
    return full


LAST = Path("checkpoints") / "step-00000008" / "model.safetensors"  # the encoder and what trains with it


@pytest.mark.parametrize(
    ("method", "extra", "part_of_state"),
    [
        ("mae", [], "decoder."),
        # 8 steps of 16 images (the last --epochs / --batch-size given wins), no local crops: half the work
        pytest.param(
            "dinov2",
            ["--opt", "local_crops=0", "--epochs", "1", "--batch-size", "16"],
            "patch_head.",
            marks=pytest.mark.slow,
        ),
    ],
    ids=["mae", "dinov2"],
)
def test_masked_image_modelling_killed_resumes_exactly(digit_folder, tmp_path, method, extra, part_of_state):
    """MAE (a decoder beside the encoder, a fresh random mask every step) and DINOv2 (block masks, an EMA
    teacher, Sinkhorn-Knopp, KoLeo, a patch head) killed after their step-2 checkpoint, resumed in a new
    process: the encoder, the heads and the metrics of an uninterrupted run."""
    recipe = [method if a == "simclr" else a for a in PRETRAIN]  # 8 steps, checkpoints every 2
    args = ["pretrain", "--data", digit_folder, *recipe, *extra, "--num-workers", "0"]
    full = _killed_at_step_2_resumes_exactly(args, tmp_path)
    assert any(k.startswith(part_of_state) for k in load_file(full / LAST))


# ------------------------------------------------------------------------------- finetune and unlearn


@pytest.fixture(scope="module")
def finetuned(digit_folder, tmp_path_factory) -> Path:
    """An uninterrupted `cvfm finetune --num-workers 0` (two torch threads)."""
    run = tmp_path_factory.mktemp("finetune") / "full"
    cvfm("finetune", "--data", digit_folder, *FINETUNE, "--num-workers", "0", "-o", run)
    return run


@pytest.mark.slow
def test_finetune_killed_resumes_exactly(finetuned, digit_folder, tmp_path):
    """Started with --num-workers 0, killed after its epoch-1 checkpoint, resumed without --num-workers."""
    part = tmp_path / "part"
    args = ["finetune", "--data", digit_folder, *FINETUNE, "--num-workers", "0", "-o", part]
    interrupt(args, _checkpoint(part, 4), signal.SIGKILL, tmp_path / "killed.log")
    assert not (part / "classifier").exists() and _status(part) == "running"

    err = cvfm("finetune", "-o", part, "--resume")
    assert _resumed_at(err, part) == 4
    for name in ("backbone/model.safetensors", "head.safetensors"):
        _same_tensors(finetuned / "classifier" / name, part / "classifier" / name)
    assert _metrics(part) == _metrics(finetuned)
    top1 = [json.loads((r / "run.json").read_text())["train_top1"] for r in (finetuned, part)]
    assert top1[0] == top1[1] is not None


@pytest.mark.slow
def test_unlearn_retrain_stopped_resumes_exactly(finetuned, tmp_path):
    """`cvfm unlearn --method retrain` stopped by SIGTERM in the 2nd epoch of its retraining (96 retained
    images: 3 steps an epoch); `--resume` in a new process ends with the weights and the metrics of an
    uninterrupted unlearn."""
    request = ["unlearn", "--model", finetuned, "--forget-class", "one", "--method", "retrain", "--no-audit"]
    cvfm(*request, "-o", tmp_path / "full")
    part = tmp_path / "part"
    err = interrupt([*request, "-o", part], _checkpoint(part, 3), signal.SIGTERM, tmp_path / "stopped.log")
    assert "stopping after this step" in err and _status(part) == "interrupted"
    assert not (part / "classifier").exists() and not (part / "unlearn.json").exists()
    stopped = max(int(p.name.split("-")[1]) for p in (part / "checkpoints").glob("step-*"))
    assert 3 < stopped < 6

    err = cvfm(*request, "-o", part, "--resume")
    assert _resumed_at(err, part) == stopped
    for name in ("backbone/model.safetensors", "head.safetensors"):
        _same_tensors(tmp_path / "full" / "classifier" / name, part / "classifier" / name)
    assert _metrics(part) == _metrics(tmp_path / "full")  # epoch 2's means cover all 3 of its steps
    records = [json.loads((r / "unlearn.json").read_text()) for r in (tmp_path / "full", part)]
    assert records[0]["model_after"]["sha256"] == records[1]["model_after"]["sha256"]
    assert records[1]["num_forgotten"] == 32


# ------------------------------------------------------------------------------ embed, caption, capfilt


def _parts(out: Path) -> list[int]:
    return sorted(int(p.stem.split("_")[1]) for p in (out / "metadata").glob("metadata_*.parquet"))


def test_embed_killed_and_rerun_writes_the_same_arrays(tmp_path):
    """359 digits in 18 parts (default workers); killed after its first part, the same command finishes
    the rest, and every part equals an uninterrupted run's."""
    args = ["embed", "cvfm/tiny-resnet", "--data", "builtin:digits", "--split", "test"]
    args += ["--part-size", "20", "--batch-size", "5", "--precision", "fp32"]
    cvfm(*args, "-o", tmp_path / "full")
    out = tmp_path / "part"
    first = out / "metadata" / "metadata_0.parquet"
    interrupt([*args, "-o", out], first.exists, signal.SIGKILL, tmp_path / "killed.log")
    done = _parts(out)
    assert 1 <= len(done) < 18, done

    cvfm(*args, "-o", out)
    assert _parts(out) == list(range(18))
    for p in range(18):  # the arrays and the metadata, byte for byte
        for name in (f"img_emb/img_emb_{p}.npy", f"metadata/metadata_{p}.parquet"):
            assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def _same_lines_after_a_kill(args: list, out_option: str, tmp_path: Path, rows: int) -> None:
    """`cvfm ARGS OUT_OPTION full.jsonl` uninterrupted; the same to part.jsonl killed after its first line,
    then run again: part.jsonl ends equal to full.jsonl, line for line."""
    full, out = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    cvfm(*args, out_option, full)
    started = lambda: out.exists() and b"\n" in out.read_bytes()  # noqa: E731
    interrupt([*args, out_option, out], started, signal.SIGKILL, tmp_path / "killed.log")
    assert 1 <= out.read_bytes().count(b"\n") < rows

    cvfm(*args, out_option, out)
    assert out.read_text() == full.read_text() and out.read_text().count("\n") == rows


@pytest.mark.slow
def test_caption_killed_and_rerun_writes_the_same_lines(digit_folder, tmp_path):
    """Sampled captions (seeded per batch) of 32 digits in batches of 2, default workers."""
    args = ["caption", "cvfm/tiny-blip", "--data", digit_folder, "--split", "test", "--top-p", "0.9"]
    args += ["--max-length", "10", "--min-length", "2", "--batch-size", "2", "--precision", "fp32"]
    _same_lines_after_a_kill(args, "-o", tmp_path, rows=32)


@pytest.mark.slow
def test_capfilt_killed_and_rerun_writes_the_same_lines(digit_folder, tmp_path):
    """32 pairs in batches of 2, default workers: the same lines, ITM scores included."""
    images = sorted((digit_folder / "test").rglob("*.png"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(json.dumps({"id": p.stem, "image": str(p), "text": "a digit"}) + "\n" for p in images)
    )
    args = ["capfilt", "--in", pairs, "-n", "1", "--max-length", "10", "--min-length", "3"]
    args += ["--batch-size", "2", "--precision", "fp32"]
    _same_lines_after_a_kill(args, "--out", tmp_path, rows=32)


@pytest.fixture(scope="module")
def scene_folder(tmp_path_factory) -> Path:
    """16 images of builtin:animal-scenes (test) as PNG files."""
    from cvfm.data.sources import open_source

    folder = tmp_path_factory.mktemp("scenes")
    source = open_source("builtin:animal-scenes", split="test")
    for i in range(16):
        source.load(i).save(folder / f"scene_{i:02d}.png")
    return folder


AUTO = ["--points-per-side", "8", "--pred-iou-thresh", "0", "--stability-score-thresh", "0.5"]
AUTO += ["--stability-score-offset", "0.05", "--precision", "fp32"]


@pytest.mark.slow  # ~25 s; test_segment_auto_cli checks the skipping of finished images in-process
@pytest.mark.parametrize("fmt", ["amg", "coco"])
def test_segment_auto_killed_and_rerun_writes_the_same_masks(scene_folder, tmp_path, fmt):
    """Killed after its second image, the same command skips the finished ones and ends with the output
    of an uninterrupted run, file for file."""
    args = ["segment", "auto", "cvfm/tiny-sam", "--data", scene_folder, "--format", fmt, *AUTO]
    cvfm(*args, "-o", tmp_path / "full")
    out = tmp_path / "part"
    partial = out / "instances.partial.jsonl"

    def finished() -> bool:  # two images written
        if fmt == "amg":
            return len([p for p in out.glob("scene_*") if p.is_dir()]) >= 2
        return partial.exists() and partial.read_bytes().count(b"\n") >= 2

    interrupt([*args, "-o", out], finished, signal.SIGKILL, tmp_path / "killed.log")
    assert not (out / "instances.json").exists()
    cvfm(*args, "-o", out)
    files = sorted(p.relative_to(tmp_path / "full") for p in (tmp_path / "full").rglob("*") if p.is_file())
    assert len(files) >= (16 if fmt == "amg" else 1)
    for rel in files:
        assert (out / rel).read_bytes() == (tmp_path / "full" / rel).read_bytes(), rel
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == files  # no leftovers


@pytest.fixture(scope="module")
def scene_coco(tmp_path_factory) -> Path:
    """16 images of builtin:animal-scenes (test) with their instance masks, as a COCO instances file."""
    from cvfm.data.coco import write_coco
    from cvfm.data.masks_source import open_masks
    from cvfm.data.sources import subset

    folder = tmp_path_factory.mktemp("scene_coco") / "coco"
    write_coco(subset(open_masks("builtin:animal-scenes", split="test"), range(16)), folder)
    return folder / "annotations.json"


# 16 images in batches of 4: 4 steps an epoch, 8 in all; checkpoints at steps 2, 4, 6 and 8.
SEGMENT_TRAIN = ["--model", "cvfm/tiny-sam", "--epochs", "2", "--batch-size", "4", "--seed", "3"]
SEGMENT_TRAIN += ["--lr", "3e-3", "--checkpoint-every", "2", "--opt", "clicks=1", "--opt", "refine=1"]


@pytest.mark.slow
def test_segment_train_killed_resumes_exactly(scene_coco, tmp_path):
    """SAM training killed after its step-4 checkpoint (default workers); --resume in a new process ends
    with the weights and metrics of an uninterrupted run: the prompts, clicks and masks drawn at each step
    are the same."""
    args = ["segment", "train", "--data", scene_coco, *SEGMENT_TRAIN]
    cvfm(*args, "-o", tmp_path / "full")
    part = tmp_path / "part"
    interrupt([*args, "-o", part], _checkpoint(part, 4), signal.SIGKILL, tmp_path / "killed.log")
    assert not (part / "backbone").exists() and _status(part) == "running"

    err = cvfm("segment", "train", "-o", part, "--resume")
    assert 4 <= _resumed_at(err, part) < 8
    full = tmp_path / "full"
    _same_tensors(full / "backbone" / "model.safetensors", part / "backbone" / "model.safetensors")
    assert _metrics(part) == _metrics(full) and _status(part) == "finished"
    assert len([r for r in _metrics(full) if "train/loss" in r]) == 8


@pytest.mark.slow
def test_distill_killed_resumes_exactly(digit_folder, tmp_path):
    """Feature distillation (a frozen tiny-vit teacher into tiny-resnet) killed after its step-2
    checkpoint, resumed in a new process: the student, its projectors and the metrics of an uninterrupted
    run (the teacher is rebuilt, never restored)."""
    recipe = [a for a in PRETRAIN if a not in ("--method", "simclr")]  # 8 steps, checkpoints every 2
    args = ["distill", "--teacher", "cvfm/tiny-vit", "--data", digit_folder, *recipe, "--num-workers", "0"]
    full = _killed_at_step_2_resumes_exactly(args, tmp_path)
    parts = {"encoder", "pooled_proj", "token_proj", "pooled_norm", "token_norm"}  # the targets' statistics
    assert {k.split(".")[0] for k in load_file(full / LAST)} == parts
