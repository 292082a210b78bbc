"""Geometry diagnostics of embeddings: how spread out, how Gaussian, how collapsed.

Collapse is the failure mode of joint-embedding training, and accuracy only shows it once labels
are at hand; these numbers show it without labels, on held-out embeddings or during training.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def effective_rank(feats: torch.Tensor) -> float:
    """RankMe: exp of the entropy of the normalised singular values of the (N, E) matrix.

    Between 1 and min(N, E): E for an isotropic cloud, k for data spanning k equal directions.
    Computed on the embeddings as they are (not centred), as RankMe defines it; 0 for all zeros.
    """
    sigma = torch.linalg.svdvals(feats.detach().double())
    total = sigma.sum()
    if total <= 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def covariance_spectrum(feats: torch.Tensor) -> np.ndarray:
    """Eigenvalues of the (unbiased) embedding covariance, largest first, clipped at 0."""
    x = feats.detach().double()
    x = x - x.mean(dim=0)
    cov = x.T @ x / max(x.shape[0] - 1, 1)
    eigs = torch.linalg.eigvalsh(cov).clamp_min(0.0).flip(0)
    return eigs.cpu().numpy()


def per_dim_variance(feats: torch.Tensor) -> np.ndarray:
    """Unbiased variance of every embedding dimension (a dead dimension shows as ~0)."""
    return feats.detach().double().var(dim=0).cpu().numpy()


def sigreg_statistic(feats: torch.Tensor, seed: int = 0, *, num_slices: int = 1024, knots: int = 17,
                     t_max: float = 3.0) -> float:
    """SIGReg (sliced Epps-Pulley) statistic of `feats` (N, E), applied as they are.

    No standardisation on purpose: the objective pushes toward a standard Gaussian, so scale and
    offset errors are part of what this measures (about 1 for N(0, I) data, growing ~0.4 N under
    collapse). Directions are fixed by `seed`. Call it outside a process group: inside one the
    statistic all-reduces across ranks.
    """
    from lejepa_platform.loss.sigreg import sigreg, slice_directions

    directions = slice_directions(feats.shape[1], num_slices, seed=seed, step=0, device=feats.device)
    with torch.no_grad():
        return float(sigreg(feats.detach().float(), directions, knots=knots, t_max=t_max))


class CollapseAlarm:
    """Warns once when SIGReg rises above `sigreg_max` or the effective rank falls below
    `min_rank_fraction * dim`; afterwards it stays silent (the first crossing is the news).

    A non-finite value counts as a crossing.
    """

    def __init__(self, dim: int, *, sigreg_max: float = 25.0, min_rank_fraction: float = 0.1):
        if dim < 1 or sigreg_max <= 0 or not 0 < min_rank_fraction <= 1:
            raise ValueError(f"CollapseAlarm needs dim >= 1, sigreg_max > 0, 0 < min_rank_fraction <= 1; "
                             f"got {dim}, {sigreg_max}, {min_rank_fraction}")
        self.sigreg_max = sigreg_max
        self.min_rank = min_rank_fraction * dim
        self.min_rank_fraction = min_rank_fraction
        self.dim = dim
        self.fired_at: int | None = None

    def update(self, step: int, sigreg_value: float, effective_rank: float) -> str | None:
        """The warning text the first time a threshold is crossed, else None."""
        if self.fired_at is not None:
            return None
        reasons = []
        if not sigreg_value <= self.sigreg_max:
            reasons.append(f"SIGReg {sigreg_value:.4g} > {self.sigreg_max:g}")
        if not (math.isfinite(effective_rank) and effective_rank >= self.min_rank):
            reasons.append(f"effective rank {effective_rank:.4g} < {self.min_rank:.4g} "
                           f"({self.min_rank_fraction:.0%} of {self.dim} dimensions)")
        if not reasons:
            return None
        self.fired_at = step
        return f"collapse alarm at step {step}: {'; '.join(reasons)}"
