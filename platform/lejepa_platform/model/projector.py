"""Projector MLP and a batch norm whose statistics span the global batch.

SIGReg and the prediction term read the projector output, so its normalisation must not depend on
how the batch is split over ranks: with per-rank batch norm, 2 ranks x B images would train a
different model from 1 rank x 2B. `GlobalBatchNorm1d` all-reduces its moments instead, which works
on CPU (gloo) where torch's SyncBatchNorm refuses to run.
"""

from __future__ import annotations

import torch
from torch import nn

from lejepa_platform.distributed import all_reduce_mean, world_size


class GlobalBatchNorm1d(nn.Module):
    """BatchNorm over (N, C) inputs whose batch mean and variance are taken over all ranks.

    Train mode normalises with the global batch mean and biased variance (two autograd-aware
    all-reduces of C floats: the mean, then the centred second moment, which avoids the
    cancellation of E[x^2] - E[x]^2). Exact equality with one process on the concatenated batch
    needs the same per-rank batch size, which data-parallel training uses. Running statistics
    follow nn.BatchNorm1d (momentum 0.1, unbiased running variance over the global count) and are
    used in eval mode. Parameters and buffers carry nn.BatchNorm1d's names so state dicts match.

    Deliberately not a subclass of torch's _BatchNorm: `convert_sync_batchnorm` would otherwise
    swap it for SyncBatchNorm, which has no CPU path.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"GlobalBatchNorm1d expects (N, {self.num_features}) inputs, got {tuple(x.shape)}")
        x32 = x.float()
        if not self.training:
            mean, var = self.running_mean, self.running_var
        else:
            mean = all_reduce_mean(x32.mean(dim=0))
            var = all_reduce_mean((x32 - mean).square().mean(dim=0))
            self._update_running_stats(mean, var, x.shape[0] * world_size())
        y = (x32 - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        unbiased = var * (count / max(count - 1, 1))
        self.running_mean.lerp_(mean.detach(), self.momentum)
        self.running_var.lerp_(unbiased.detach(), self.momentum)
        self.num_batches_tracked += 1

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


def _norm(kind: str, width: int) -> nn.Module:
    if kind == "batchnorm":
        return GlobalBatchNorm1d(width)
    if kind == "layernorm":
        return nn.LayerNorm(width)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown projector norm {kind!r}: use batchnorm, layernorm or none")


class Projector(nn.Sequential):
    """`layers` linear layers in_dim -> hidden -> ... -> out_dim; norm + GELU between them.

    Linear layers followed by batch norm carry no bias: the norm's mean subtraction cancels it.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int, norm: str):
        if layers < 1:
            raise ValueError(f"a projector needs >= 1 linear layer, got {layers}")
        widths = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        modules: list[nn.Module] = []
        for i in range(layers):
            last = i == layers - 1
            modules.append(nn.Linear(widths[i], widths[i + 1], bias=last or norm != "batchnorm"))
            if not last:
                modules += [_norm(norm, widths[i + 1]), nn.GELU()]
        super().__init__(*modules)
