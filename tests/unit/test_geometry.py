"""Geometry diagnostics against closed forms, the collapse alarm, and the PNG plots."""

import math

import numpy as np
import pytest
import torch

from lejepa_platform.eval.geometry import (CollapseAlarm, covariance_spectrum, effective_rank, per_dim_variance,
                                           sigreg_statistic)
from lejepa_platform.eval.plots import plot_loss_curve, plot_patch_pca, plot_spectrum

pytestmark = pytest.mark.unit

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _orthonormal(n, k, seed):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=_gen(seed), dtype=torch.float64))
    return q


def test_effective_rank_closed_form_from_singular_values():
    s = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    x = _orthonormal(40, 5, 1) @ torch.diag(s) @ _orthonormal(5, 5, 2).T
    p = (s / s.sum())[:4]
    assert effective_rank(x) == pytest.approx(math.exp(-(p * p.log()).sum().item()), rel=1e-9)


def test_effective_rank_isotropic_gaussian_is_near_full():
    x = torch.randn(4000, 32, generator=_gen())
    assert 0.97 * 32 < effective_rank(x) <= 32


@pytest.mark.parametrize("k", [1, 3, 8])
def test_effective_rank_of_rank_k_data_is_k(k):
    x = torch.randn(4000, k, generator=_gen(k)) @ _orthonormal(32, k, 7).T.float()
    assert 0.97 * k < effective_rank(x) <= k + 1e-3


def test_effective_rank_of_zeros_is_zero():
    assert effective_rank(torch.zeros(10, 4)) == 0.0


def test_covariance_spectrum_and_per_dim_variance_match_numpy():
    scales = torch.tensor([3.0, 2.0, 1.0, 0.5])
    x = torch.randn(5000, 4, generator=_gen()) * scales + torch.tensor([10.0, -4.0, 0.0, 1.0])
    eigs = covariance_spectrum(x)
    ref = np.sort(np.linalg.eigvalsh(np.cov(x.double().numpy(), rowvar=False)))[::-1]
    np.testing.assert_allclose(eigs, ref, rtol=1e-9)
    assert np.all(np.diff(eigs) <= 0)
    np.testing.assert_allclose(eigs, scales.double().square().numpy(), rtol=0.08)  # independent axes
    var = per_dim_variance(x)
    np.testing.assert_allclose(var, x.double().numpy().var(axis=0, ddof=1), rtol=1e-12)
    assert eigs.sum() == pytest.approx(var.sum(), rel=1e-9)  # trace


def test_sigreg_statistic_separates_gaussian_from_collapse():
    n, d = 1024, 16
    gauss = torch.randn(n, d, generator=_gen())
    value = sigreg_statistic(gauss, seed=0)
    assert 0.3 < value < 3.0
    assert sigreg_statistic(gauss, seed=0) == value  # directions fixed by the seed
    collapsed = sigreg_statistic(torch.zeros(n, d), seed=0)
    assert collapsed > 0.35 * n  # grows like ~0.40 N
    assert sigreg_statistic(2 * gauss, seed=0) > 20 * value


def test_collapse_alarm_fires_once_on_sigreg():
    alarm = CollapseAlarm(dim=64, sigreg_max=25.0, min_rank_fraction=0.1)
    assert alarm.update(0, 1.2, 40.0) is None
    assert alarm.update(10, 25.0, 6.4) is None  # on the thresholds: not crossed
    message = alarm.update(20, 30.0, 40.0)
    assert message == "collapse alarm at step 20: SIGReg 30 > 25"
    assert alarm.fired_at == 20
    assert alarm.update(30, 500.0, 1.0) is None
    assert alarm.update(40, float("nan"), 1.0) is None


def test_collapse_alarm_fires_on_rank_and_on_nan():
    alarm = CollapseAlarm(dim=64, min_rank_fraction=0.1)
    assert alarm.update(5, 1.0, 6.3) == "collapse alarm at step 5: effective rank 6.3 < 6.4 (10% of 64 dimensions)"
    both = CollapseAlarm(dim=64).update(7, float("nan"), float("nan"))
    assert both.startswith("collapse alarm at step 7: SIGReg nan > 25; effective rank nan < 6.4")


def _assert_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 1024


def test_plots_write_non_empty_pngs(tmp_path):
    eigs = np.sort(np.random.default_rng(0).exponential(size=32))[::-1]
    _assert_png(plot_spectrum(eigs, tmp_path / "sub" / "spectrum.png"))
    steps = list(range(0, 100, 10))
    _assert_png(plot_loss_curve(steps, {"loss": [1 / (s + 1) for s in steps], "sigreg": [2.0] * 10},
                                tmp_path / "loss.png"))
    rng = np.random.default_rng(1)
    grids = [rng.normal(size=(4, 4, 12)) for _ in range(3)]
    images = [rng.integers(0, 256, size=(3, 32, 32), dtype=np.uint8) for _ in range(3)]
    _assert_png(plot_patch_pca(grids, images, tmp_path / "pca.png"))


def test_plot_loss_curve_rejects_ragged_series(tmp_path):
    with pytest.raises(ValueError, match="series 'loss' has 2 values for 3 steps"):
        plot_loss_curve([0, 1, 2], {"loss": [1.0, 0.5]}, tmp_path / "x.png")


def test_loss_curve_has_one_panel_per_term_on_its_own_scale():
    """SIGReg falling from 14 to 4 next to a prediction term near 0.05: each keeps its own y range."""
    from lejepa_platform.eval.plots import loss_curve_figure

    steps = list(range(1, 51))
    series = {"loss/total": [0.05 + 0.02 * (14 - 0.2 * s) for s in steps],
              "loss/prediction": [0.05 + 0.001 * (s % 7) for s in steps],
              "loss/sigreg": [14 - 0.2 * s for s in steps]}
    axes = loss_curve_figure(steps, series).axes
    assert [ax.get_title() for ax in axes] == list(series)
    for ax, values in zip(axes, series.values()):
        low, high = ax.get_ylim()
        assert low <= min(values) and max(values) <= high
        assert high - low < 2 * (max(values) - min(values))  # the panel is scaled to its own term
