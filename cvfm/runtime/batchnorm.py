"""BatchNorm over the global batch on CPU processes, so that N processes x B train what 1 process x N*B does.

torch's SyncBatchNorm runs on GPUs only (torch 2.14: its statistics kernels are CUDA-only and DDP refuses
it on CPU modules), so on GPUs the trainer converts BatchNorm layers to it. Under `torchrun` on CPUs
(gloo), `GlobalBatchNorm` instead takes over every training-mode `F.batch_norm` call made inside it, of
any BatchNorm layer (timm's BatchNormAct2d too) without replacing modules: the per-channel sums are
all-reduced, autograd sends the gradients back through the all-reduce, and the running statistics
are updated from the global batch as torch's BatchNorm does (unbiased variance).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_reduce
from torch.overrides import TorchFunctionMode


class GlobalBatchNorm(TorchFunctionMode):
    """Within `with GlobalBatchNorm():`, training-mode batch norm uses the statistics of every process."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.batch_norm and dist.is_initialized() and dist.get_world_size() > 1:
            return _global_batch_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _global_batch_norm(
    x, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5
):
    if not training:
        return F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    dims, shape = [0, *range(2, x.ndim)], (1, -1, *[1] * (x.ndim - 2))
    xf = x.float()
    count = xf.new_full((1,), x.numel() // x.shape[1])
    sums = all_reduce(torch.cat([xf.sum(dims), count]), "sum", dist.group.WORLD)
    n = sums[-1]
    mean = sums[:-1] / n
    centred = xf - mean.view(shape)
    var = all_reduce(centred.square().sum(dims), "sum", dist.group.WORLD) / n
    if running_mean is not None:
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * n / (n - 1)).to(running_var.dtype), momentum)
    y = centred * torch.rsqrt(var + eps).view(shape)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y.to(x.dtype)
