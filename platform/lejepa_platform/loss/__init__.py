"""LeJEPA objective: SIGReg (sketched Epps-Pulley) and the prediction term. Pure torch."""

from lejepa_platform.loss.lejepa import LeJEPALoss, lejepa_loss
from lejepa_platform.loss.sigreg import quadrature, sigreg, sigreg_per_view, slice_directions

__all__ = ["LeJEPALoss", "lejepa_loss", "quadrature", "sigreg", "sigreg_per_view", "slice_directions"]
