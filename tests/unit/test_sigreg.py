"""SIGReg: closed forms, known values, parity with the straightforward version, numerics, errors."""

import math

import pytest
import torch

from lejepa_platform.bench.sigreg import baseline_sigreg
from lejepa_platform.errors import UserError
from lejepa_platform.loss import quadrature, sigreg, sigreg_per_view, slice_directions
from lejepa_platform.loss.sigreg import _EcfMeans, _rotations

pytestmark = pytest.mark.unit


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _inputs(kind: str, n: int, d: int) -> torch.Tensor:
    z = _randn(n, d, seed=3)
    return {"gaussian": z, "uniform": torch.rand(n, d, generator=torch.Generator().manual_seed(4)) * 4 - 2,
            "shifted": 0.7 * z + 0.5}[kind]


def _closed_form(x: torch.Tensor) -> torch.Tensor:
    """n * integral over the whole line of |ECF - exp(-t^2/2)|^2 exp(-t^2/2), per column of x (n, M)."""
    x = x.double()
    n = x.shape[0]
    pair = torch.exp(-0.5 * (x[:, None, :] - x[None, :, :]).square()).sum(dim=(0, 1))
    single = torch.exp(-0.25 * x.square()).sum(dim=0)
    integral = math.sqrt(2 * math.pi) / n**2 * pair - 2 * math.sqrt(math.pi) / n * single + math.sqrt(2 * math.pi / 3)
    return n * integral


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference relative to the max abs reference value."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _value_and_grad(fn, z, directions, **kw):
    z = z.detach().clone().requires_grad_(True)
    value = fn(z, directions, **kw)
    value.backward()
    return value.detach(), z.grad


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "shifted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_window_equals_closed_form(kind, dtype):
    z = _inputs(kind, 96, 8).to(dtype)
    a = slice_directions(8, 16, seed=1, step=0)
    expected = _closed_form(z.double() @ a.double()).mean()
    got = sigreg(z, a, knots=257, t_max=8.0)
    assert got.dtype == dtype
    assert abs(float(got) - float(expected)) / float(expected) < (1e-5 if dtype == torch.float32 else 1e-10)


def test_quadrature_is_doubled_trapezoid_times_window():
    t, phi, w = quadrature(5, 2.0, dtype=torch.float64)
    torch.testing.assert_close(t, torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64))
    torch.testing.assert_close(phi, torch.exp(-t.square() / 2))
    torch.testing.assert_close(w, torch.tensor([0.5, 1.0, 1.0, 1.0, 0.5], dtype=torch.float64) * phi)


@pytest.mark.parametrize("kind", ["gaussian", "uniform", "shifted"])
def test_default_quadrature_matches_dense_integral(kind):
    z = _inputs(kind, 128, 8).double()
    a = slice_directions(8, 32, seed=2, step=0)
    default = sigreg(z, a)
    dense = sigreg(z, a, knots=2049, t_max=3.0)
    assert abs(float(default) / float(dense) - 1) < 5e-3


def test_standard_gaussian_averages_its_expectation():
    # E[stat] = sum_k w_k (1 - exp(-t_k^2)) exactly (Var cos + Var sin = 1 - phi^2), ~1.05, for any N.
    _, phi, w = quadrature(17, 3.0, dtype=torch.float64)
    expectation = float((w * (1 - phi.square())).sum())
    assert abs(expectation - 1.05) < 0.01
    values = [float(sigreg(_randn(256, 64, seed=s), slice_directions(64, 1024, seed=s, step=0))) for s in range(8)]
    mean = sum(values) / len(values)
    assert abs(mean - expectation) < 0.1
    assert all(0.8 < v < 1.4 for v in values)


def test_collapse_and_distortions_score_far_above_gaussian():
    # Known values (t_max 3, K 17, D 64, M 1024, N 256): zeros ~103, rank-1 ~43, scaled by 2 ~61.
    n, d = 256, 64
    a = slice_directions(d, 1024, seed=0, step=0)
    z = _randn(n, d, seed=5)
    _, phi, w = quadrature(17, 3.0, dtype=torch.float64)
    zeros = float(sigreg(torch.zeros(n, d), a))
    assert zeros == pytest.approx(n * float((w * (1 - phi).square()).sum()), rel=1e-5)  # ECF == 1 exactly
    assert zeros == pytest.approx(103, rel=0.02)
    rank_one = float(sigreg(_randn(n, 1, seed=6) * _randn(1, d, seed=7), a))
    assert rank_one == pytest.approx(43, rel=0.1)
    assert float(sigreg(2 * z, a)) == pytest.approx(61, rel=0.1)
    assert min(zeros, rank_one) > 30 * float(sigreg(z, a))


def test_custom_function_gradcheck_float64():
    x = _randn(7, 5, seed=8, dtype=torch.float64).requires_grad_(True)
    # 7 slices in chunks of 3 (ragged last chunk), 19 knots (crosses two re-seeds of the recurrence).
    assert torch.autograd.gradcheck(lambda x: _EcfMeans.apply(x, 0.3, 19, 3), (x,))
    z = _randn(2, 6, 4, seed=9, dtype=torch.float64).requires_grad_(True)
    a = slice_directions(4, 5, seed=0, step=0).double()
    assert torch.autograd.gradcheck(lambda z: sigreg(z, a, knots=9, chunk_size=2), (z,))


@pytest.mark.parametrize("shape,chunk", [((64, 16), None), ((3, 50, 16), 7), ((200, 16), 1)])
def test_parity_with_straightforward_version(shape, chunk):
    z = _randn(*shape, seed=10) * 1.3
    a = slice_directions(16, 40, seed=3, step=7)
    value, grad = _value_and_grad(sigreg, z, a, chunk_size=chunk)
    ref_value, ref_grad = _value_and_grad(baseline_sigreg, z, a)
    assert abs(float(value) / float(ref_value) - 1) < 1e-5
    assert _rel(grad, ref_grad) < 1e-5


def test_chunk_size_does_not_change_result():
    z = _randn(2, 40, 12, seed=11)
    a = slice_directions(12, 33, seed=4, step=0)
    ref_value, ref_grad = _value_and_grad(sigreg, z, a, chunk_size=66)
    for chunk in (1, 5, 32, 1000):
        value, grad = _value_and_grad(sigreg, z, a, chunk_size=chunk)
        assert float(value) == pytest.approx(float(ref_value), rel=1e-6)
        assert _rel(grad, ref_grad) < 1e-6


def test_per_view_is_not_inflated_by_pooling_identical_views():
    z = _randn(64, 16, seed=12)
    a = slice_directions(16, 64, seed=5, step=0)
    views = z.expand(4, 64, 16)
    single = sigreg(z, a)
    per_view = sigreg_per_view(views, a)
    assert per_view.shape == (4,)
    torch.testing.assert_close(per_view, single.expand(4), rtol=1e-6, atol=0)
    pooled = sigreg(views.reshape(4 * 64, 16), a)  # same ECF, 4x the sample count
    assert float(pooled) == pytest.approx(4 * float(single), rel=1e-5)


def test_per_view_values_are_each_views_own_statistic():
    views = torch.stack([_randn(50, 8, seed=13), torch.zeros(50, 8), 3 * _randn(50, 8, seed=14)])
    a = slice_directions(8, 20, seed=6, step=0)
    per_view = sigreg_per_view(views, a)
    torch.testing.assert_close(per_view, torch.stack([sigreg(v, a) for v in views]), rtol=1e-6, atol=0)
    assert float(sigreg(views, a)) == pytest.approx(float(per_view.mean()), rel=1e-6)


def test_directions_are_deterministic_unit_norm_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    a = slice_directions(32, 100, seed=7, step=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.shape == (32, 100) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=0), torch.ones(100), rtol=0, atol=1e-6)
    assert torch.equal(a, slice_directions(32, 100, seed=7, step=3, device="cpu"))
    assert not torch.allclose(a, slice_directions(32, 100, seed=7, step=4))
    assert not torch.allclose(a, slice_directions(32, 100, seed=8, step=3))
    assert not torch.allclose(slice_directions(32, 100, seed=0, step=1), slice_directions(32, 100, seed=1, step=0))


@pytest.mark.parametrize("knots,t_max", [(17, 3.0), (257, 3.0)])
def test_recurrence_error_stays_at_float32_rounding(knots, t_max):
    x = _randn(32, 256, seed=15) * 2
    dt = t_max / (knots - 1)
    worst = max(float(torch.maximum((c.double() - (x.double() * k * dt).cos()).abs(),
                                    (s.double() - (x.double() * k * dt).sin()).abs()).max())
                for k, c, s in _rotations(x, dt, knots))
    assert worst < 2e-6


def test_recurrence_at_wide_window_is_as_accurate_as_direct_float32():
    # At t = 8 the float32 angle itself is off by ~ulp(64); the recurrence must add no more than that.
    x = _randn(32, 256, seed=16) * 2
    dt = 8.0 / 256
    worst = direct = 0.0
    for k, c, s in _rotations(x, dt, 257):
        exact = (x.double() * k * dt).cos()
        worst = max(worst, float((c.double() - exact).abs().max()))
        direct = max(direct, float(((x * (k * dt)).cos().double() - exact).abs().max()))
    assert worst < 1.5 * direct


def test_bf16_autocast_input_is_computed_in_float32():
    z = _randn(64, 16, seed=17).bfloat16()
    a = slice_directions(16, 32, seed=8, step=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = sigreg(z, a)
    assert value.dtype == torch.float32
    assert float(value) == pytest.approx(float(sigreg(z.float(), a)), rel=1e-6)


@pytest.mark.parametrize("z,a,kw,match", [
    (torch.zeros(8), torch.zeros(8, 4), {}, "shape \\(N, D\\) or \\(V, N, D\\)"),
    (torch.zeros(2, 2, 8, 4), torch.zeros(4, 4), {}, "shape \\(N, D\\) or \\(V, N, D\\)"),
    (torch.zeros(8, 4, dtype=torch.long), torch.zeros(4, 4), {}, "floating tensor"),
    (torch.zeros(8, 5), torch.zeros(4, 4), {}, "D=5 but directions have 4 rows"),
    (torch.zeros(8, 4), torch.zeros(4), {}, "directions must be"),
    (torch.zeros(0, 4), torch.zeros(4, 4), {}, "at least one sample"),
    (torch.tensor([[0.0, float("nan")]]), torch.zeros(2, 3), {}, "NaN or Inf"),
    (torch.tensor([[0.0, float("inf")]]), torch.zeros(2, 3), {}, "NaN or Inf"),
    (torch.zeros(8, 4), torch.zeros(4, 4), {"knots": 16}, "odd integer >= 3"),
    (torch.zeros(8, 4), torch.zeros(4, 4), {"knots": 1}, "odd integer >= 3"),
    (torch.zeros(8, 4), torch.zeros(4, 4), {"t_max": 0.0}, "t_max must be a finite number > 0"),
    (torch.zeros(8, 4), torch.zeros(4, 4), {"t_max": -1.0}, "t_max must be a finite number > 0"),
    (torch.zeros(8, 4), torch.zeros(4, 4), {"t_max": float("inf")}, "t_max must be a finite number > 0"),
    (torch.zeros(8, 4), torch.zeros(4, 4), {"chunk_size": 0}, "chunk_size must be a positive integer"),
])
def test_bad_input_raises_user_error(z, a, kw, match):
    with pytest.raises(UserError, match=match):
        sigreg(z, a, **kw)


def test_bad_direction_sizes_raise_user_error():
    with pytest.raises(UserError, match="num_slices >= 1"):
        slice_directions(8, 0, seed=0, step=0)
