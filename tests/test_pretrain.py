"""The shared training loop: exact resume, collapse signals, refusal to overwrite."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from cvfm.errors import UsageError
from cvfm.eval.run import evaluate
from cvfm.pretrain import PretrainConfig, pretrain
from cvfm.runtime.checkpoint import latest_checkpoint


@pytest.fixture(autouse=True)
def _data(digit_folder, monkeypatch):
    monkeypatch.setitem(DEFAULTS, "data", str(digit_folder))


DEFAULTS = dict(
    split="train",
    method="dino",
    model="cvfm/tiny-resnet",
    epochs=2,
    batch_size=32,
    num_workers=0,
    checkpoint_every=3,
    options={"local_crops": "2", "out_dim": "128"},
)


def _config(out, **kw) -> PretrainConfig:
    """128 images, batch 32: 4 steps an epoch."""
    return PretrainConfig(**{**DEFAULTS, "output": str(out), **kw})


def _weights(run) -> dict[str, torch.Tensor]:
    return load_file(run / "backbone" / "model.safetensors")


def _final_state(run) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run / "checkpoints") / "model.safetensors")


class Crash(Exception):
    pass


def _stop_at(step_to_stop: int, exc: type[BaseException] | None = None):
    """Raise `exc` at that step, or (None) send this process a real SIGINT, as Ctrl-C would."""

    def on_step(step: int) -> None:
        if step == step_to_stop:
            if exc is None:
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise exc()

    return on_step


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


@pytest.mark.parametrize("method", [pytest.param("dino", marks=pytest.mark.slow), "byol", "sscd"])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, method):
    opts = {"local_crops": "2", "out_dim": "128"} if method == "dino" else {}
    full = pretrain(_config(tmp_path / "full", method=method, options=opts))

    # Ctrl-C mid-epoch: the step finishes, a checkpoint is written there, and the run resumes from it.
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        pretrain(_config(part, method=method, options=opts), on_step=_stop_at(5))
    assert json.loads((part / "run.json").read_text())["status"] == "interrupted"
    assert latest_checkpoint(part / "checkpoints").name == "step-00000005"
    pretrain(_config(part, resume=True))

    _assert_same(_weights(full), _weights(part))
    _assert_same(_final_state(full), _final_state(part))  # teacher, heads, DINO centre included
    # the same records, none repeated; epoch 2's epoch/* means cover all 4 of its steps, not the 3 resumed
    assert _records(part) == _records(full)


def _records(run) -> list[dict]:
    """metrics.jsonl without the wall-clock speed."""
    records = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


@pytest.mark.slow
def test_crash_resumes_from_last_periodic_checkpoint(tmp_path):
    full = pretrain(_config(tmp_path / "full", epochs=2))
    part = tmp_path / "part"
    with pytest.raises(Crash):
        pretrain(_config(part, epochs=2), on_step=_stop_at(7, Crash))  # no checkpoint at 7; the last is at 6
    assert latest_checkpoint(part / "checkpoints").name == "step-00000006"
    pretrain(_config(part, resume=True))
    _assert_same(_weights(full), _weights(part))


def test_existing_run_folder_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UsageError, match="--overwrite"):
        pretrain(_config(out, epochs=1))
    assert (out / "keep.txt").read_text() == "precious"


def _entropy_run(tmp_path, name, **options):
    opts = {"local_crops": "2", "out_dim": "64", "head_bn": "false", **options}  # the paper's plain head
    run = pretrain(_config(tmp_path / name, epochs=6, lr=3e-3, options=opts))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "train/teacher_entropy" in r][-5:]
    entropy = sum(r["train/teacher_entropy"] for r in last) / len(last)
    return entropy, last[-1]["train/teacher_entropy_max"]


@pytest.mark.slow
def test_dino_without_centering_or_sharpening_shows_collapse(tmp_path):
    healthy, ln_k = _entropy_run(tmp_path, "both")
    no_center, _ = _entropy_run(tmp_path, "no_center", centering="false")
    no_sharpen, _ = _entropy_run(tmp_path, "no_sharpen", sharpening="false")
    # DINO paper, Fig. 7: sharpening alone collapses to one dimension (entropy -> 0),
    # centering alone to the uniform distribution (entropy -> ln K). Measured, first step -> mean of the
    # last 5 (ln K = 4.16): both 2.97 -> 3.86, no centering 2.97 -> 1.33, no sharpening 3.90 -> 4.14;
    # neither collapse threshold holds at the random init.
    assert no_center < 0.5 * healthy
    assert no_sharpen > 0.99 * ln_k
    assert healthy < 0.97 * ln_k


def test_trackers_monitor_and_run_record(tmp_path, digit_folder):
    run = pretrain(
        _config(
            tmp_path / "run",
            method="simclr",
            options={},
            log=("jsonl", "tensorboard"),
            monitor=str(digit_folder),
        )
    )
    assert list((run / "cvfm").glob("events.out.tfevents.*")), "TensorBoard tracker wrote no event file"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    monitored = [r for r in records if "monitor/knn_top1@20" in r]
    assert [r["step"] for r in monitored] == [0, 4, 8]  # before training, then after each epoch

    # Each reading is `evaluate knn` of the weights at that step: first the random init (0.8125 here, far
    # above the chance 0.25, so no threshold tells trained from untrained), last the saved backbone.
    def knn(model: str) -> float:
        record = evaluate("knn", model, str(digit_folder), ks=(20,), num_workers=0, device="cpu")
        return record["metrics"]["knn_top1@20"]

    assert monitored[0]["monitor/knn_top1@20"] == pytest.approx(knn("cvfm/tiny-resnet"), abs=1e-9)
    assert monitored[-1]["monitor/knn_top1@20"] == pytest.approx(knn(str(run)), abs=1e-9)
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and record["step"] == 8
    assert record["resolved"]["total_steps"] == 8 and record["resolved"]["steps_per_epoch"] == 4
    assert record["data"]["images"] == 128 and record["data"]["classes"] == ["one", "three", "two", "zero"]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    run = pretrain(
        _config(tmp_path / "run", method="simclr", options={}, epochs=1, batch_size=16, grad_accum=2)
    )
    record = json.loads((run / "run.json").read_text())
    assert record["resolved"]["steps_per_epoch"] == 4  # 128 images / (16 x 2)
    assert record["resolved"]["global_batch_size"] == 32
    steps = [
        r["step"]
        for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        if "train/loss" in r
    ]
    assert steps == [1, 2, 3, 4]


def test_vit_backbone_pretrains_and_exports(tmp_path):
    import timm

    run = pretrain(_config(tmp_path / "vit", model="cvfm/tiny-vit", epochs=1))
    assert (
        json.loads((run / "run.json").read_text())["method_config"]["head_bn"] is False
    )  # no BatchNorm in a ViT
    model = timm.create_model(f"local-dir:{run / 'backbone'}", pretrained=True).eval()
    from cvfm import create_encoder

    encoder = create_encoder(str(run)).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), encoder(x))
    assert not list(run.glob(".*.tmp")), "no temporary folder is left behind"
