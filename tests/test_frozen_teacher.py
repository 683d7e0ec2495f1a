"""A method's frozen teacher (`Method(frozen_teacher=...)`, the slot `distill` fills): used by the method,
never trained, checkpointed, exported or converted, and resume stays exact with one."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.layers import convert_sync_batchnorm
from torch import nn

from cvfm.data.views import MultiView, two_views
from cvfm.methods import METHODS, Budget
from cvfm.methods.base import Method, feature_std
from cvfm.pretrain import PretrainConfig, pretrain
from cvfm.registry import create_encoder
from cvfm.runtime.checkpoint import checkpoints


@dataclass
class ToyConfig:
    min_scale: float = 0.5


def _teacher() -> nn.Module:
    """Always the same weights, without touching the global RNG (the student's init stays the run's)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        return create_encoder("cvfm/tiny-resnet")


class ToyDistill(Method):
    """Regress the frozen teacher's features of the same views with a linear head over the student's."""

    built: list[ToyDistill] = []  # every instance, so a test can look at the teacher after a run

    def __init__(self, encoder, cfg: ToyConfig, budget: Budget):
        super().__init__(encoder, cfg, budget, frozen_teacher=_teacher())
        self.head = nn.Linear(encoder.num_features, self.frozen_teacher.num_features)
        ToyDistill.built.append(self)

    def views(self) -> MultiView:
        return two_views(self.encoder.preprocess, min_scale=self.cfg.min_scale)

    def forward(self, batch, step):
        x = torch.cat(batch["image"][:2])
        with torch.no_grad():
            target = self.frozen_teacher(x)
        return F.mse_loss(self.head(self.encoder(x)), target), {"feature_std": feature_std(target)}


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, "toy-distill", (ToyDistill, ToyConfig))
    ToyDistill.built.clear()


def _config(out, data, **kw) -> PretrainConfig:
    """128 images, batch 32: 4 steps, checkpoints at steps 2 and 4."""
    base = dict(data=str(data), split="train", method="toy-distill", epochs=1, batch_size=32, num_workers=0)
    return PretrainConfig(**{**base, "output": str(out), "checkpoint_every": 2, **kw})


def _assert_unchanged_teacher(method: ToyDistill) -> None:
    teacher, fresh = method.frozen_teacher, _teacher().state_dict()
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    state = teacher.state_dict()
    assert state.keys() == fresh.keys()
    for k in fresh:  # weights and BatchNorm running statistics: eval mode, no grad, never in the optimizer
        assert torch.equal(state[k], fresh[k]), f"teacher {k} changed in training"


def test_the_frozen_teacher_is_outside_the_module_tree(toy):
    method = ToyDistill(create_encoder("cvfm/tiny-resnet"), ToyConfig(), Budget(8, 1, 1, 8))
    teacher = method.frozen_teacher
    assert not any(k.startswith("frozen_teacher") for k in method.state_dict())
    assert not {id(p) for p in teacher.parameters()} & {id(p) for p in method.parameters()}
    method.train()
    assert not teacher.training
    converted = convert_sync_batchnorm(method)  # what the loop does on several GPUs
    assert converted.frozen_teacher is teacher
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in teacher.modules())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.encoder.modules())


def test_teacher_is_neither_checkpointed_nor_exported_nor_changed_and_resume_is_exact(
    toy, digit_folder, tmp_path
):
    full = pretrain(_config(tmp_path / "full", digit_folder))
    method = ToyDistill.built[-1]
    _assert_unchanged_teacher(method)
    trained = set(method.state_dict())
    assert {k.split(".")[0] for k in trained} == {"encoder", "head"}
    saved = checkpoints(full / "checkpoints")
    assert [p.name for p in saved] == [f"step-{s:08d}" for s in (2, 4)]
    for ckpt in saved:  # the method's own state, no teacher; the optimizer only over the trained parameters
        assert set(load_file(ckpt / "model.safetensors")) == trained
        optimizer = torch.load(ckpt / "optimizer.pt", weights_only=True)
        assert sum(len(g["params"]) for g in optimizer["param_groups"]) == len(list(method.parameters()))
    reference = tmp_path / "encoder"
    create_encoder("cvfm/tiny-resnet").save(reference)
    exported = load_file(full / "backbone" / "model.safetensors")
    assert exported.keys() == load_file(reference / "model.safetensors").keys()
    student = {k.removeprefix("encoder.model."): v for k, v in method.state_dict().items()}
    assert all(torch.equal(exported[k], student[k]) for k in exported)  # the student, not the teacher

    part = tmp_path / "part"
    ctrl_c = lambda step: step == 3 and os.kill(os.getpid(), signal.SIGINT)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):  # a real Ctrl-C: the step ends, a checkpoint at step 3, stop
        pretrain(_config(part, digit_folder), on_step=ctrl_c)
    pretrain(PretrainConfig(data="", output=str(part), resume=True))
    _assert_unchanged_teacher(ToyDistill.built[-1])
    for name in ("backbone/model.safetensors", "checkpoints/step-00000004/model.safetensors"):
        a, b = load_file(full / name), load_file(part / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
