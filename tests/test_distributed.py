"""Cross-process parts of the losses, run with two real gloo processes on the CPU."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cvfm.methods.simclr import nt_xent


def _worker(rank: int, init_file: str, z1: torch.Tensor, z2: torch.Tensor, out: torch.Tensor) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        half = z1.shape[0] // 2
        mine = slice(rank * half, (rank + 1) * half)
        a, b = z1[mine].clone().requires_grad_(True), z2[mine].clone().requires_grad_(True)
        loss = nt_xent(a, b, 0.2)
        loss.backward()
        out[rank, 0] = loss.detach()
        out[rank, 1] = a.grad.abs().sum()
    finally:
        dist.destroy_process_group()


def test_simclr_negatives_gathered_across_processes_match_one_big_batch(tmp_path):
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    out = torch.zeros(2, 2).share_memory_()
    mp.spawn(_worker, args=(str(tmp_path / "init"), z1, z2, out), nprocs=2, join=True)

    # One process with the whole batch: each anchor sees the same 2N - 2 negatives.
    a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
    whole = nt_xent(a, b, 0.2)
    whole.backward()
    torch.testing.assert_close(out[:, 0].mean(), whole.detach(), atol=1e-5, rtol=1e-5)
    # Per-process gradients are those of the local mean loss: half the batch, so twice the weight.
    torch.testing.assert_close(out[:, 1].sum(), 2 * a.grad.abs().sum(), atol=1e-4, rtol=1e-4)
