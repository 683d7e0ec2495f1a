"""Cross-process parts of the losses (SimCLR and SSCD negatives, CLIP features) and BatchNorm over the
global batch, run with two real gloo processes on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from timm.layers import BatchNormAct2d
from torch import nn

from cvfm.methods.clip import clip_loss
from cvfm.methods.simclr import nt_xent
from cvfm.methods.sscd import sscd_loss
from cvfm.runtime.batchnorm import GlobalBatchNorm

LOSSES = {
    "simclr": lambda a, b: nt_xent(a, b, 0.2),
    "sscd": lambda a, b: sum(sscd_loss(a, b, 0.05, 30.0)),  # InfoNCE + entropy over every process's views
}


def _worker(rank: int, init_file: str, name: str, z1: torch.Tensor, z2: torch.Tensor, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        half = z1.shape[0] // 2
        mine = slice(rank * half, (rank + 1) * half)
        a, b = z1[mine].clone().requires_grad_(True), z2[mine].clone().requires_grad_(True)
        loss = LOSSES[name](a, b)
        loss.backward()
        out["loss"][rank] = loss.detach()
        out["z1_grad"][mine] = a.grad
        out["z2_grad"][mine] = b.grad
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(LOSSES))
def test_contrastive_negatives_gathered_across_processes_match_one_big_batch(tmp_path, name):
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    out = {
        "loss": torch.zeros(2).share_memory_(),
        "z1_grad": torch.zeros(8, 16).share_memory_(),
        "z2_grad": torch.zeros(8, 16).share_memory_(),
    }
    mp.spawn(_worker, args=(str(tmp_path / "init"), name, z1, z2, out), nprocs=2, join=True)

    # One process with the whole batch: each anchor sees the same 2N - 2 negatives.
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    whole = LOSSES[name](a, b)
    whole.backward()
    torch.testing.assert_close(out["loss"].mean(), whole.detach(), atol=1e-5, rtol=1e-5)
    # all_gather's backward sums every process's gradient for a slice: each process holds the gradient of
    # the sum of the two local losses, twice that of their mean (the one-batch loss), row for row.
    torch.testing.assert_close(out["z1_grad"], 2 * a.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["z2_grad"], 2 * b.grad, atol=1e-5, rtol=1e-4)


def _clip_worker(rank: int, init_file: str, img: torch.Tensor, txt: torch.Tensor, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        half = img.shape[0] // 2
        mine = slice(rank * half, (rank + 1) * half)
        a, b = img[mine].clone().requires_grad_(True), txt[mine].clone().requires_grad_(True)
        scale = torch.tensor(2.5, requires_grad=True)
        loss = clip_loss(a, b, scale)
        loss.backward()
        out["loss"][rank] = loss.detach()
        out["img_grad"][mine] = a.grad
        out["txt_grad"][mine] = b.grad
        out["scale_grad"][rank] = scale.grad
    finally:
        dist.destroy_process_group()


def test_clip_features_gathered_across_processes_match_one_big_batch(tmp_path):
    torch.manual_seed(0)
    img, txt = torch.randn(8, 16), torch.randn(8, 16)
    out = {
        "loss": torch.zeros(2).share_memory_(),
        "scale_grad": torch.zeros(2).share_memory_(),
        "img_grad": torch.zeros(8, 16).share_memory_(),
        "txt_grad": torch.zeros(8, 16).share_memory_(),
    }
    mp.spawn(_clip_worker, args=(str(tmp_path / "init"), img, txt, out), nprocs=2, join=True)

    # One process with the concatenated batch: every image scored against all 8 texts and vice versa.
    a, b = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    scale = torch.tensor(2.5, requires_grad=True)
    whole = clip_loss(a, b, scale)
    whole.backward()
    torch.testing.assert_close(out["loss"].mean(), whole.detach(), atol=1e-5, rtol=1e-5)
    # all_gather's backward sums every process's gradient for a slice: each process holds the gradient
    # of the sum of the two local losses, i.e. twice that of their mean, the one-batch loss; DDP's
    # averaging over the 2 processes then gives the one-batch gradient exactly.
    torch.testing.assert_close(out["img_grad"], 2 * a.grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["txt_grad"], 2 * b.grad, atol=1e-5, rtol=1e-4)
    # The logit scale is not gathered: the average of the local gradients is the one-batch gradient.
    torch.testing.assert_close(out["scale_grad"].mean(), scale.grad, atol=1e-5, rtol=1e-4)


def _bn_model() -> nn.Module:
    """torch's BatchNorm2d and BatchNorm1d, and timm's BatchNormAct2d (norm + ReLU in one layer)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.Conv2d(4, 4, 1),
        BatchNormAct2d(4),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6),
        nn.BatchNorm1d(6),
    )


def _bn_worker(rank: int, init_file: str, x: torch.Tensor, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = _bn_model()
        mine = slice(rank * 4, (rank + 1) * 4)
        with GlobalBatchNorm():
            y = model(x[mine].contiguous(memory_format=torch.channels_last))  # the layout conv nets get
        y.sin().mean().backward()
        out["y"][mine] = y.detach()
        state = model.state_dict()
        for k in out["state"]:
            out["state"][k][rank] = state[k]
        for k, p in model.named_parameters():
            out["grad"][k][rank] = p.grad
    finally:
        dist.destroy_process_group()


def test_global_batch_norm_on_two_processes_equals_one_big_batch(tmp_path):
    torch.manual_seed(1)
    x = 3 * torch.randn(8, 3, 6, 6) + 1
    whole = _bn_model()
    y = whole(x)
    y.sin().mean().backward()
    state = whole.state_dict()
    out = {
        "y": torch.zeros_like(y).share_memory_(),
        "state": {k: torch.zeros(2, *v.shape, dtype=v.dtype).share_memory_() for k, v in state.items()},
        "grad": {k: torch.zeros(2, *p.shape).share_memory_() for k, p in whole.named_parameters()},
    }
    mp.spawn(_bn_worker, args=(str(tmp_path / "init"), x, out), nprocs=2, join=True)

    # Each half is normalised by the statistics of all 8 samples, as in the one-batch forward.
    torch.testing.assert_close(out["y"], y.detach(), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out["y"][:4], _bn_model()(x[:4]), atol=1e-2)  # not its own half's
    # Running statistics (unbiased variance) and step counts: the one-batch ones, on both processes.
    for k, v in state.items():
        for rank in range(2):
            torch.testing.assert_close(out["state"][k][rank], v, atol=1e-5, rtol=1e-5, msg=k)
    # Gradients reach the other process's samples through the statistics: DDP's average of the two
    # processes' gradients is the gradient of the one-batch loss.
    for k, p in whole.named_parameters():
        torch.testing.assert_close(out["grad"][k].mean(0), p.grad, atol=1e-5, rtol=1e-4, msg=k)
