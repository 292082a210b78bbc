"""Scaling-law fits and rank correlation: pure functions of numbers, no MLflow, no files.

The least squares is scipy's (`curve_fit`, `linregress`, `spearmanr`); what is ours is the model
choice (saturating or pure power law), the relative residuals and a starting point that needs no
guess: for a fixed exponent the saturating law is linear in (a, c), so a grid over the exponent
with a 2-parameter linear solve at each point finds the basin before `curve_fit` refines it.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import optimize, stats

from lejepa_platform.errors import UserError

SATURATING_MIN_X = 4
"""Distinct x values needed to fit a * x^-b + c (3 parameters plus at least one degree of freedom)."""
B_MAX = 5.0
B_MIN = B_MAX / 500
"""The exponent of the saturating law is bounded to [B_MIN, B_MAX]."""


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """y = a * x^(-b) + c with one-sigma standard errors; `kind` says which model was fitted.

    kind "saturating": all three parameters, least squares on relative residuals (y - f) / y,
    i.e. multiplicative noise, the usual case for losses and accuracies.
    kind "pure": c fixed at 0 (c_err 0), least squares on log y against log x; used when fewer
    than `SATURATING_MIN_X` distinct x values exist. Errors are NaN without a spare degree of freedom.
    """

    a: float
    b: float
    c: float
    a_err: float
    b_err: float
    c_err: float
    n_points: int
    kind: str

    def predict(self, x: Any) -> np.ndarray:
        return self.a * np.power(np.asarray(x, dtype=float), -self.b) + self.c

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite numbers become None."""
        return {k: finite_or_none(v) for k, v in dataclasses.asdict(self).items()}

    @property
    def b_at_bound(self) -> bool:
        """A saturating fit whose exponent sits at the edge of [B_MIN, B_MAX]: no saturation in the points."""
        return self.kind == "saturating" and not 2 * B_MIN < self.b < B_MAX - B_MIN


def finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLawFit:
    """Fit y = a * x^(-b) + c (b in [B_MIN, B_MAX]) or, with too few distinct x, the pure law y = a * x^(-b)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise UserError(f"power-law fit needs two 1-d sequences of equal length, got {xs.shape} and {ys.shape}")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys)) and np.all(xs > 0) and np.all(ys > 0)):
        raise UserError("power-law fit needs finite, strictly positive x and y values")
    distinct = np.unique(xs).size
    if distinct < 2:
        raise UserError(f"power-law fit needs at least 2 distinct x values, got {distinct}")
    if distinct >= SATURATING_MIN_X:
        return _fit_saturating(xs, ys)
    return _fit_pure(xs, ys)


def _fit_pure(x: np.ndarray, y: np.ndarray) -> PowerLawFit:
    """log y = log a - b log x by ordinary least squares; a's error by the delta method."""
    line = stats.linregress(np.log(x), np.log(y))
    a = math.exp(line.intercept)
    spare = x.size > 2
    return PowerLawFit(a=a, b=-float(line.slope), c=0.0, a_err=a * line.intercept_stderr if spare else math.nan,
                       b_err=float(line.stderr) if spare else math.nan, c_err=0.0, n_points=int(x.size), kind="pure")


def _fit_saturating(x: np.ndarray, y: np.ndarray) -> PowerLawFit:
    """`curve_fit` of a' * (x / x0)^(-b) + c with sigma = y (relative residuals), x0 the geometric
    mean of x so that a' and b are not numerically entangled; then a = a' * x0^b."""
    log_x0 = float(np.mean(np.log(x)))
    u = np.log(x) - log_x0

    def model(u: np.ndarray, a: float, b: float, c: float) -> np.ndarray:
        return a * np.exp(-b * u) + c

    (a_scaled, b, c), cov_scaled = optimize.curve_fit(
        model, u, y, p0=_saturating_start(u, y), sigma=y, bounds=([-np.inf, B_MIN, -np.inf], [np.inf, B_MAX, np.inf]),
        xtol=1e-15, ftol=1e-15, gtol=1e-15)
    # a = a' * x0^b: carry the covariance over with the Jacobian of (a', b, c) -> (a, b, c).
    scale = math.exp(b * log_x0)
    to_abc = np.array([[scale, a_scaled * scale * log_x0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    errs = np.sqrt(np.clip(np.diag(to_abc @ cov_scaled @ to_abc.T), 0.0, None))
    return PowerLawFit(a=float(a_scaled * scale), b=float(b), c=float(c), a_err=float(errs[0]), b_err=float(errs[1]),
                       c_err=float(errs[2]), n_points=int(x.size), kind="saturating")


def _saturating_start(u: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(a', b, c) with b on a 500-point grid over the bounds and (a', c) the linear least squares
    on relative residuals at that b: the grid point with the smallest residual."""
    best: tuple[float, tuple[float, float, float]] | None = None
    for b in np.linspace(B_MIN, B_MAX, 500):
        design = np.column_stack([np.exp(-b * u), np.ones_like(u)]) / y[:, None]
        (a, c), *_ = np.linalg.lstsq(design, np.ones_like(u), rcond=None)
        rss = float(np.sum((design @ np.array([a, c]) - 1.0) ** 2))
        if best is None or rss < best[0]:
            best = (rss, (float(a), float(b), float(c)))
    return best[1]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (ties share their mean rank); NaN if either side is constant."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1 or xs.size < 2:
        raise UserError(f"spearman needs two 1-d sequences of equal length >= 2, got {xs.shape} and {ys.shape}")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise UserError("spearman needs finite values")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)  # a constant side: NaN, said in the report
        return float(stats.spearmanr(xs, ys).statistic)
