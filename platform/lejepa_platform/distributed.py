"""Autograd-aware cross-rank means, shared by SIGReg and the global batch norm.

Statistics over the global batch (ECF values, batch-norm moments) are means over ranks of
per-rank means. Every rank then computes the same loss from the same reduced value, so the
backward pass must SUM the upstream gradients over ranks: each rank's gradient becomes
world_size x its own share, and DDP's gradient averaging restores the single-process gradient
exactly. World size is read at call time, so the same code runs in and out of a process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Ranks in the default process group, 1 when none is initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks forward; sum of the upstream gradients over ranks backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = grad.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over ranks (SUM / world size: AVG is not on every backend); identity alone."""
    size = world_size()
    if size == 1:
        return x
    return _AllReduceSum.apply(x) / size


def any_rank(flag: torch.Tensor) -> torch.Tensor:
    """True on every rank when `flag` (a bool tensor) is true on any rank; enqueued on the device
    like any collective, never read back here."""
    if world_size() == 1:
        return flag
    value = flag.float()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value > 0
