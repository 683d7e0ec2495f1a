"""Cross-process parts of the losses (SimCLR negatives, CLIP features), run with two real gloo processes
on the CPU."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cvfm.methods.clip import clip_loss
from cvfm.methods.simclr import nt_xent


def _worker(rank: int, init_file: str, z1: torch.Tensor, z2: torch.Tensor, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        half = z1.shape[0] // 2
        mine = slice(rank * half, (rank + 1) * half)
        a, b = z1[mine].clone().requires_grad_(True), z2[mine].clone().requires_grad_(True)
        loss = nt_xent(a, b, 0.2)
        loss.backward()
        out["loss"][rank] = loss.detach()
        out["z1_grad"][mine] = a.grad
        out["z2_grad"][mine] = b.grad
    finally:
        dist.destroy_process_group()


def test_simclr_negatives_gathered_across_processes_match_one_big_batch(tmp_path):
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    out = {
        "loss": torch.zeros(2).share_memory_(),
        "z1_grad": torch.zeros(8, 16).share_memory_(),
        "z2_grad": torch.zeros(8, 16).share_memory_(),
    }
    mp.spawn(_worker, args=(str(tmp_path / "init"), z1, z2, out), nprocs=2, join=True)

    # One process with the whole batch: each anchor sees the same 2N - 2 negatives.
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    whole = nt_xent(a, b, 0.2)
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
