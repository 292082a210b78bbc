"""LeJEPA loss: the prediction term by hand, the lam mix, per-view SIGReg, dtype and input errors."""

import dataclasses

import pytest
import torch

from lejepa_platform.errors import UserError
from lejepa_platform.loss import LeJEPALoss, lejepa_loss, sigreg, sigreg_per_view, slice_directions

pytestmark = pytest.mark.unit


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_prediction_by_hand():
    # Image 0: globals (1, 0), (3, 2) -> centre (2, 1); local (2, 3).
    #   squared errors averaged over dims: 1, 1, 2.
    # Image 1: globals (0, 0), (0, 4) -> centre (0, 2); local (6, 2).
    #   squared errors averaged over dims: 2, 2, 18.
    global_proj = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[3.0, 2.0], [0.0, 4.0]]])
    local_proj = torch.tensor([[[2.0, 3.0], [6.0, 2.0]]])
    out = lejepa_loss(global_proj, local_proj, slice_directions(2, 8, seed=0, step=0), lam=0.5)
    assert float(out.prediction) == pytest.approx((1 + 1 + 2 + 2 + 2 + 18) / 6, rel=1e-6)


def test_global_views_only_reduce_to_minimal_example():
    z = _randn(4, 32, 16, seed=1)
    out = lejepa_loss(z, None, slice_directions(16, 64, seed=0, step=0), lam=0.02)
    assert float(out.prediction) == pytest.approx(float((z.mean(0) - z).square().mean()), rel=1e-6)
    assert out.sigreg_per_view.shape == (4,)


def test_total_mixes_terms_and_sigreg_is_per_view_over_all_views():
    global_proj, local_proj = _randn(2, 24, 8, seed=2), 1.5 * _randn(3, 24, 8, seed=3)
    a = slice_directions(8, 32, seed=1, step=5)
    lam = 0.3
    out = lejepa_loss(global_proj, local_proj, a, lam=lam, knots=9, t_max=4.0)
    assert isinstance(out, LeJEPALoss)
    expected_views = sigreg_per_view(torch.cat([global_proj, local_proj]), a, knots=9, t_max=4.0)
    torch.testing.assert_close(out.sigreg_per_view, expected_views, rtol=1e-6, atol=0)
    assert float(out.sigreg) == pytest.approx(float(sigreg(torch.cat([global_proj, local_proj]), a, knots=9, t_max=4.0)),
                                              rel=1e-6)
    assert float(out.total) == pytest.approx((1 - lam) * float(out.prediction) + lam * float(out.sigreg), rel=1e-6)
    assert float(out.sigreg_per_view[2:].mean()) > float(out.sigreg_per_view[:2].mean())  # scaled locals score worse


def test_gradients_reach_both_view_sets_and_result_is_frozen():
    global_proj = _randn(2, 16, 8, seed=4).requires_grad_(True)
    local_proj = _randn(2, 16, 8, seed=5).requires_grad_(True)
    out = lejepa_loss(global_proj, local_proj, slice_directions(8, 16, seed=0, step=0), lam=0.05)
    out.total.backward()
    for g in (global_proj.grad, local_proj.grad):
        assert g is not None and bool(torch.isfinite(g).all()) and float(g.abs().sum()) > 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.total = torch.tensor(0.0)


def test_bf16_autocast_projections_give_float32_terms():
    global_proj, local_proj = _randn(2, 16, 8, seed=6).bfloat16(), _randn(1, 16, 8, seed=7).bfloat16()
    a = slice_directions(8, 16, seed=0, step=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lejepa_loss(global_proj, local_proj, a, lam=0.05)
    reference = lejepa_loss(global_proj.float(), local_proj.float(), a, lam=0.05)
    for field in ("total", "prediction", "sigreg"):
        value = getattr(out, field)
        assert value.dtype == torch.float32
        assert float(value) == pytest.approx(float(getattr(reference, field)), rel=1e-6)


@pytest.mark.parametrize("lam", [0.0, 1.0, -0.1, 1.5, float("nan"), True])
def test_lam_outside_open_unit_interval_raises(lam):
    with pytest.raises(UserError, match="lam must be in the open interval"):
        lejepa_loss(_randn(2, 8, 4), None, slice_directions(4, 8, seed=0, step=0), lam=lam)


@pytest.mark.parametrize("global_proj,local_proj,match", [
    (torch.zeros(8, 4), None, "global_proj must be a floating tensor of shape \\(G, N, P\\)"),
    (torch.zeros(0, 8, 4), None, "G >= 1"),
    (torch.zeros(2, 8, 4, dtype=torch.long), None, "global_proj must be a floating tensor"),
    (torch.zeros(2, 8, 4), torch.zeros(2, 7, 4), "local_proj must be None or a floating tensor of shape \\(L, N, P\\) = \\(L, 8, 4\\)"),
    (torch.zeros(2, 8, 4), torch.zeros(8, 4), "local_proj must be None"),
    (torch.zeros(2, 8, 5), None, "D=5 but directions have 4 rows"),
    (torch.full((2, 8, 4), float("nan")), None, "NaN or Inf"),
])
def test_bad_projections_raise_user_error(global_proj, local_proj, match):
    with pytest.raises(UserError, match=match):
        lejepa_loss(global_proj, local_proj, slice_directions(4, 8, seed=0, step=0), lam=0.05)
