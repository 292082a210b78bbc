"""The LeJEPA objective: (1 - lam) * prediction + lam * SIGReg, with every term kept for logging.

Prediction: per image, the centre is the mean projection of its global views; every view (global
and local) is pulled towards it (squared error, mean over dims, views and images). No stop-gradient,
no teacher. SIGReg is applied per view and averaged over all views.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from lejepa_platform.errors import UserError
from lejepa_platform.loss.sigreg import describe, sigreg_per_view


@dataclasses.dataclass(frozen=True)
class LeJEPALoss:
    """Result of `lejepa_loss`; all tensors carry gradients (float32)."""

    total: torch.Tensor
    """(1 - lam) * prediction + lam * sigreg: the scalar to backpropagate."""
    prediction: torch.Tensor
    """Mean squared distance of every view's projection to its image's global-view centre."""
    sigreg: torch.Tensor
    """SIGReg averaged over all views."""
    sigreg_per_view: torch.Tensor
    """SIGReg of each view (V,), globals first then locals: a per-view geometry diagnostic."""


def lejepa_loss(global_proj: torch.Tensor, local_proj: torch.Tensor | None, directions: torch.Tensor, *,
                lam: float, knots: int = 17, t_max: float = 3.0, check_finite: bool | None = None) -> LeJEPALoss:
    """LeJEPA loss of projections: global views (G, N, P) and optional local views (L, N, P).

    `directions` (P, M) come from `slice_directions(P, M, seed=..., step=...)`. Computed in float32
    under autocast. The prediction term is a mean over this rank's images (DDP averages its
    gradient); SIGReg uses ECF means over the global batch. `check_finite` is passed to SIGReg; a
    trainer that checks the total itself turns it off and reports the step with every term.
    """
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (0.0 < lam < 1.0 and math.isfinite(lam)):
        raise UserError(f"loss lam must be in the open interval (0, 1), got {lam!r}")
    views = _views(global_proj, local_proj)
    with torch.autocast(device_type=views.device.type, enabled=False):
        views = views.float() if views.dtype != torch.float64 else views
        per_view = sigreg_per_view(views, directions, knots=knots, t_max=t_max, check_finite=check_finite)
        centre = views[: global_proj.shape[0]].mean(dim=0)
        prediction = (views - centre).square().mean()
        sig = per_view.mean()
        total = (1.0 - lam) * prediction + lam * sig
    return LeJEPALoss(total=total, prediction=prediction, sigreg=sig, sigreg_per_view=per_view)


def _views(global_proj: torch.Tensor, local_proj: torch.Tensor | None) -> torch.Tensor:
    """Validate shapes and stack all views (G + L, N, P), globals first."""
    if (not isinstance(global_proj, torch.Tensor) or not global_proj.is_floating_point()
            or global_proj.dim() != 3 or global_proj.shape[0] < 1):
        raise UserError("global_proj must be a floating tensor of shape (G, N, P) with G >= 1, got "
                        + describe(global_proj))
    if local_proj is None:
        return global_proj
    if (not isinstance(local_proj, torch.Tensor) or not local_proj.is_floating_point()
            or local_proj.dim() != 3 or local_proj.shape[1:] != global_proj.shape[1:]):
        raise UserError(f"local_proj must be None or a floating tensor of shape (L, N, P) = (L, "
                        f"{global_proj.shape[1]}, {global_proj.shape[2]}) matching global_proj, got "
                        + describe(local_proj))
    return torch.cat((global_proj, local_proj.to(global_proj.dtype)))
