"""GlobalBatchNorm1d across 2 gloo ranks with B rows each equals one process with the 2B rows:
outputs, input gradients, summed parameter gradients and running statistics."""

from __future__ import annotations

import pytest
import torch
from gloo import run_in_gloo

from lejepa_platform.model import GlobalBatchNorm1d

pytestmark = pytest.mark.dist

B, C = 6, 5


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2 * B, C, generator=gen) * 3 + 2, torch.randn(2 * B, C, generator=gen)


def _run(rank: int, x: torch.Tensor, upstream: torch.Tensor, world: int) -> dict[str, torch.Tensor]:
    """Two train-mode steps on this rank's rows; the loss is this rank's share of sum(y * upstream)."""
    bn = GlobalBatchNorm1d(C)
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, C))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, C))
    rows = slice(rank * (2 * B // world), (rank + 1) * (2 * B // world))
    x = x[rows].clone().requires_grad_()
    for _ in range(2):
        y = bn(x)
        (y * upstream[rows]).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
            "running_mean": bn.running_mean, "running_var": bn.running_var}


def test_two_ranks_equal_one_process_on_the_concatenated_batch():
    x, upstream = _data()
    single = _run(0, x, upstream, 1)
    ranks = run_in_gloo(2, _run, x, upstream, 2)
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), single["y"], **close)
    # each rank's input gradient includes the other rank's loss through the shared statistics
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), single["x_grad"], **close)
    for name in ("weight_grad", "bias_grad"):  # DDP sums (then averages) these over ranks
        torch.testing.assert_close(ranks[0][name] + ranks[1][name], single[name], **close)
    for name in ("running_mean", "running_var"):  # unbiased over the global count 2B, same on both ranks
        torch.testing.assert_close(ranks[0][name], single[name], **close)
        torch.testing.assert_close(ranks[1][name], single[name], **close)
