"""Sweep analysis: trials from MLflow -> table -> power-law fits, Spearman, plots, markdown report.

The maths (`fit_power_law`, `spearman`) is plain numpy so it is testable against closed forms and
runs without scipy. Runs are read through `tracking` (the only module that talks to MLflow).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from lejepa_platform import tracking
from lejepa_platform.errors import UserError
from lejepa_platform.redact import redact_uri

PARAMS_OF_INTEREST = ("model.backbone", "loss.num_slices", "loss.lam", "data.batch_size", "train.steps")
"""Always shown in the table; params that differ between trials are added after them."""
PER_TRIAL_PARAMS = frozenset({"train.name", "train.storage_path", "track.run_name", "track.uri", "track.experiment"})
"""Params that differ between trials without being a sweep axis."""
FINAL_METRICS = ("loss/total", "loss/prediction", "loss/sigreg", "probe/online_acc",
                 "eval/pretrained/linear", "eval/pretrained/knn_k20")
ACCURACY_PREFERENCE = ("eval/pretrained/linear", "eval/pretrained/knn_k20", "probe/online_acc")
"""Offline frozen-feature protocols first: the online probe trains alongside and is optimistic."""
PARAMS_METRIC = "model/params"
FLOPS_METRIC = "compute/flops"
SATURATING_MIN_X = 4
"""Distinct x values needed to fit a * x^-b + c (3 parameters plus at least one degree of freedom)."""
_B_MAX = 5.0
_B_MIN = _B_MAX / 500
"""The exponent of the saturating law is searched in [_B_MIN, _B_MAX] (grid step _B_MIN)."""


# --------------------------------------------------------------------------------------------
# Power-law fit.


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
        return {k: _finite_or_none(v) for k, v in dataclasses.asdict(self).items()}


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLawFit:
    """Fit y = a * x^(-b) + c (b in [0.01, 5]) or, with too few distinct x, the pure law y = a * x^(-b)."""
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
    lx, ly = np.log(x), np.log(y)
    center = lx.mean()
    design = np.column_stack([np.ones_like(lx), -(lx - center)])
    (alpha, b), *_ = np.linalg.lstsq(design, ly, rcond=None)
    dof = x.size - 2
    if dof > 0:
        s2 = float(np.sum((ly - design @ np.array([alpha, b])) ** 2)) / dof
        cov = s2 * np.linalg.inv(design.T @ design)
    else:
        cov = np.full((2, 2), np.nan)
    # log a = alpha + b * center; delta method for a = exp(log a).
    grad = np.array([1.0, center])
    log_a_err = math.sqrt(max(float(grad @ cov @ grad), 0.0)) if dof > 0 else math.nan
    a = math.exp(alpha + b * center)
    return PowerLawFit(a=a, b=float(b), c=0.0, a_err=a * log_a_err, b_err=math.sqrt(cov[1, 1]) if dof > 0 else math.nan,
                       c_err=0.0, n_points=int(x.size), kind="pure")


def _fit_saturating(x: np.ndarray, y: np.ndarray) -> PowerLawFit:
    """Variable projection: for a fixed b the model is linear in (a, c), so the least-squares
    problem is a 1-d search over b (grid, then golden section), which has no starting-point trouble.
    x is scaled by its geometric mean so that a and b are not numerically entangled."""
    log_x0 = float(np.mean(np.log(x)))
    u = np.log(x) - log_x0
    w = 1.0 / y

    def solve(b: float) -> tuple[float, np.ndarray]:
        design = np.column_stack([np.exp(-b * u), np.ones_like(u)]) * w[:, None]
        coef, *_ = np.linalg.lstsq(design, np.ones_like(u), rcond=None)
        return float(np.sum((design @ coef - 1.0) ** 2)), coef

    grid = np.linspace(_B_MIN, _B_MAX, 500)
    best = int(np.argmin(_profile_rss(grid, u, w)))
    b = _golden_min(lambda v: solve(v)[0], grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)])
    rss_b, (a_scaled, c) = solve(b)

    power = np.exp(-b * u)
    jac = np.column_stack([power * w, -a_scaled * u * power * w, w])
    cov_scaled = rss_b / (x.size - 3) * np.linalg.pinv(jac.T @ jac)
    # a = a_scaled * x0^b: carry the covariance over with the Jacobian of that map.
    scale = math.exp(b * log_x0)
    to_abc = np.array([[scale, a_scaled * scale * log_x0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    cov = to_abc @ cov_scaled @ to_abc.T
    errs = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    return PowerLawFit(a=float(a_scaled * scale), b=float(b), c=float(c), a_err=float(errs[0]), b_err=float(errs[1]),
                       c_err=float(errs[2]), n_points=int(x.size), kind="saturating")


def _profile_rss(bs: np.ndarray, u: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Residual sum of squares at the best (a, c) for every b at once (2x2 normal equations)."""
    p = np.exp(-bs[:, None] * u[None, :]) * w
    pp, pq, qq = np.sum(p * p, axis=1), p @ w, float(w @ w)
    p1, q1 = p.sum(axis=1), float(w.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        det = pp * qq - pq * pq
        a = (p1 * qq - q1 * pq) / det
        c = (pp * q1 - pq * p1) / det
        resid = a[:, None] * p + c[:, None] * w - 1.0
        rss = np.sum(resid * resid, axis=1)
    return np.where(np.isfinite(rss), rss, np.inf)


def _golden_min(f, lo: float, hi: float, tol: float = 1e-10) -> float:
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    left, right = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    f_left, f_right = f(left), f(right)
    while hi - lo > tol:
        if f_left < f_right:
            hi, right, f_right = right, left, f_left
            left = hi - ratio * (hi - lo)
            f_left = f(left)
        else:
            lo, left, f_left = left, right, f_right
            right = lo + ratio * (hi - lo)
            f_right = f(right)
    return (lo + hi) / 2.0


# --------------------------------------------------------------------------------------------
# Rank correlation.


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts_group = np.r_[True, ordered[1:] != ordered[:-1]]
    starts = np.flatnonzero(starts_group)
    ends = np.r_[starts[1:], values.size]
    mean_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(values.size)
    ranks[order] = mean_rank[np.cumsum(starts_group) - 1]
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson correlation of average ranks); NaN if either side is constant."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1 or xs.size < 2:
        raise UserError(f"spearman needs two 1-d sequences of equal length >= 2, got {xs.shape} and {ys.shape}")
    if not (np.all(np.isfinite(xs)) and np.all(np.isfinite(ys))):
        raise UserError("spearman needs finite values")
    rx, ry = _average_ranks(xs), _average_ranks(ys)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    return float(rx @ ry) / denom if denom > 0 else math.nan


# --------------------------------------------------------------------------------------------
# Trial table.


def _number(text: Any) -> Any:
    """MLflow params are strings: give numbers back their type, leave everything else alone."""
    if not isinstance(text, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


def _varying_params(runs: list[dict]) -> list[str]:
    keys = sorted({k for run in runs for k in run.get("params", {})} - PER_TRIAL_PARAMS - set(PARAMS_OF_INTEREST))
    return [k for k in keys if len({run.get("params", {}).get(k) for run in runs}) > 1]


def trial_table(runs: list[dict]) -> list[dict]:
    """One row per run: params of interest and sweep axes, final metrics, parameter count,
    compute (logged, else estimated as 6 * params * images seen) and wall time in seconds."""
    columns = list(PARAMS_OF_INTEREST) + _varying_params(runs)
    rows = []
    for run in runs:
        params, metrics = run.get("params", {}), run.get("metrics", {})
        row: dict[str, Any] = {"run_id": run.get("run_id"), "name": run.get("name"), "status": run.get("status")}
        row.update({key: _number(params.get(key)) for key in columns})
        row.update({key: metrics.get(key) for key in FINAL_METRICS})
        n_params = metrics.get(PARAMS_METRIC)
        flops, source = metrics.get(FLOPS_METRIC), "logged"
        batch, steps = row["data.batch_size"], row["train.steps"]
        if flops is None:
            source = None
            if n_params and isinstance(batch, (int, float)) and isinstance(steps, (int, float)):
                flops, source = 6.0 * n_params * batch * steps, "estimated"
        row[PARAMS_METRIC] = n_params
        row[FLOPS_METRIC] = flops
        row["compute/source"] = source
        start, end = run.get("start_time"), run.get("end_time")
        row["wall_time_s"] = (end - start) / 1000.0 if start is not None and end is not None else None
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------
# Analysis.


def _points(rows: list[dict], x_key: str, y_key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r[x_key], r[y_key]) for r in rows if _positive(r.get(x_key)) and _positive(r.get(y_key))]
    return np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _fit_or_reason(rows: list[dict], x_key: str, y_key: str | None) -> tuple[dict, PowerLawFit | None]:
    if y_key is None:
        return {"skipped": "no accuracy metric was logged"}, None
    x, y = _points(rows, x_key, y_key)
    if np.unique(x).size < 2:
        return {"skipped": f"needs trials with at least 2 distinct positive {x_key} values and a {y_key}; "
                           f"found {np.unique(x).size}"}, None
    fit = fit_power_law(x, y)
    entry = {"x": x_key, "y": y_key, **fit.to_dict()}
    if fit.kind == "saturating" and not 2 * _B_MIN < fit.b < _B_MAX - _B_MIN:
        entry["note"] = (f"b at the edge of the searched range [{_B_MIN:g}, {_B_MAX:g}]: the points show no "
                         "saturation, so a and c are not identified")
    return entry, fit


def _pick_accuracy(rows: list[dict], requested: str | None) -> str | None:
    if requested is not None:
        return requested
    return next((m for m in ACCURACY_PREFERENCE if any(_positive(r.get(m)) for r in rows)), None)


def analyze(runs: list[dict], out_dir: str, *, label_free_metric: str = "loss/total",
            accuracy_metric: str | None = None, title: str = "sweep") -> dict[str, Any]:
    """Table, power-law fits (label-free metric and accuracy against parameters and compute),
    Spearman between the label-free metric and accuracy, PNG plots and report.md in `out_dir`.

    `accuracy_metric` None picks the first of ACCURACY_PREFERENCE that was logged.
    """
    if not runs:
        raise UserError("nothing to analyze: no runs given")
    rows = trial_table(runs)
    accuracy = _pick_accuracy(rows, accuracy_metric)
    fits, fitted = {}, {}
    for name, x_key, y_key in (("loss_vs_params", PARAMS_METRIC, label_free_metric),
                               ("loss_vs_compute", FLOPS_METRIC, label_free_metric),
                               ("accuracy_vs_params", PARAMS_METRIC, accuracy),
                               ("accuracy_vs_compute", FLOPS_METRIC, accuracy)):
        fits[name], fitted[name] = _fit_or_reason(rows, x_key, y_key)
    rank = _spearman_entry(rows, label_free_metric, accuracy)

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(rows, out, label_free_metric, accuracy, fitted, rank)
    result = {"title": title, "trials": len(rows), "label_free_metric": label_free_metric,
              "accuracy_metric": accuracy, "table": [{k: _finite_or_none(v) for k, v in r.items()} for r in rows],
              "fits": fits, "spearman": rank, "plots": plots}
    report = out / "report.md"
    report.write_text(_markdown(result))
    result["report"] = str(report)
    result["json"] = str(out / "analysis.json")
    _write_json(result)
    return result


def _write_json(result: dict[str, Any]) -> None:
    pathlib.Path(result["json"]).write_text(json.dumps(result, indent=2, default=str))


def _spearman_entry(rows: list[dict], label_free: str, accuracy: str | None) -> dict[str, Any]:
    if accuracy is None:
        return {"skipped": "no accuracy metric was logged"}
    pairs = [(r[label_free], r[accuracy]) for r in rows
             if _finite(r.get(label_free)) and _finite(r.get(accuracy))]
    if len(pairs) < 2:
        return {"skipped": f"needs at least 2 trials with both {label_free} and {accuracy}; found {len(pairs)}"}
    value = spearman([p[0] for p in pairs], [p[1] for p in pairs])
    return {"x": label_free, "y": accuracy, "value": _finite_or_none(value), "n": len(pairs)}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# --------------------------------------------------------------------------------------------
# Plots and report.


def _plots(rows: list[dict], out: pathlib.Path, label_free: str, accuracy: str | None,
           fitted: dict[str, PowerLawFit | None], rank: dict) -> dict[str, str]:
    """PNG files through matplotlib's object API (no pyplot, no global backend switch)."""
    from matplotlib.figure import Figure

    paths: dict[str, str] = {}

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=120)
        paths[name] = str(path)

    def scatter_with_fit(name: str, x_key: str, y_key: str | None, log_y: bool) -> None:
        if y_key is None:
            return
        x, y = _points(rows, x_key, y_key)
        if x.size == 0:
            return
        fig = Figure(figsize=(5.5, 4))
        ax = fig.add_subplot()
        ax.scatter(x, y, color="C0", label="trials")
        fit = fitted.get(name)
        if fit is not None:
            grid = np.geomspace(x.min(), x.max(), 200)
            ax.plot(grid, fit.predict(grid), color="C1", label=_fit_label(fit))
            ax.legend(fontsize=8)
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel(y_key)
        ax.set_title(f"{y_key} vs {x_key}")
        save(fig, name)

    scatter_with_fit("loss_vs_params", PARAMS_METRIC, label_free, log_y=True)
    scatter_with_fit("accuracy_vs_compute", FLOPS_METRIC, accuracy, log_y=False)
    if "value" in rank:
        pairs = [(r[label_free], r[accuracy]) for r in rows if _finite(r.get(label_free)) and _finite(r.get(accuracy))]
        fig = Figure(figsize=(5.5, 4))
        ax = fig.add_subplot()
        ax.scatter([p[0] for p in pairs], [p[1] for p in pairs], color="C2")
        ax.set_xlabel(f"{label_free} (label-free)")
        ax.set_ylabel(accuracy)
        shown = "undefined" if rank["value"] is None else f"{rank['value']:.3f}"
        ax.set_title(f"Spearman = {shown} (n = {rank['n']})")
        save(fig, "labelfree_vs_accuracy")
    return paths


def _fit_label(fit: PowerLawFit) -> str:
    text = f"b = {fit.b:.3g} ± {fit.b_err:.2g}"
    return text + (f", c = {fit.c:.3g} ± {fit.c_err:.2g}" if fit.kind == "saturating" else " (pure power law)")


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _markdown(result: dict[str, Any]) -> str:
    rows = result["table"]
    columns = [c for c in rows[0] if c != "status" and any(r.get(c) is not None for r in rows)]
    lines = [f"# Sweep analysis: {result['title']}", "",
             f"{result['trials']} trials. Label-free metric: `{result['label_free_metric']}`; "
             f"accuracy: `{result['accuracy_metric'] or 'none logged'}`"
             + (" (online probe, trained alongside: optimistic)." if result["accuracy_metric"] == "probe/online_acc"
                else "."), "",
             "## Trials", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    lines += ["", "## Power-law fits", "",
              "y = a * x^(-b) + c (saturating, relative residuals) or y = a * x^(-b) (pure, log-log) "
              f"when fewer than {SATURATING_MIN_X} distinct x; one-sigma standard errors.", "",
              "| relation | model | n | a | b | c |", "|---|---|---|---|---|---|"]
    for name, fit in result["fits"].items():
        if "skipped" in fit:
            lines.append(f"| {name} | skipped: {_cell(fit['skipped'])} | | | | |")
        else:
            kind = f"{fit['kind']} ({fit['note']})" if "note" in fit else fit["kind"]
            lines.append(f"| {name} | {kind} | {fit['n_points']} | "
                         + " | ".join(f"{_cell(fit[p])} ± {_cell(fit[p + '_err'])}" for p in ("a", "b", "c")) + " |")
    rank = result["spearman"]
    lines += ["", "## Label-free model selection", ""]
    if "skipped" in rank:
        lines.append(f"Spearman skipped: {rank['skipped']}.")
    else:
        lines.append(f"Spearman between `{rank['x']}` and `{rank['y']}` over {rank['n']} trials: "
                     f"{_cell(rank['value']) or 'undefined (a constant column)'}. A lower loss should mean a "
                     "higher accuracy, so a useful label-free metric gives a value near -1.")
    if result["plots"]:
        lines += ["", "## Plots", ""]
        lines += [f"![{name}]({pathlib.Path(path).name})" for name, path in result["plots"].items()]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# CLI entry point.


def analyze_from_cli(experiment: str, *, tracking_uri: str | None, out: str | None) -> dict[str, Any]:
    """`lejepa analyze`: analyze the latest sweep of `experiment` (its parent run's children; all
    runs if no sweep parent exists) and attach the report and plots to the parent run."""
    uri = tracking.resolve_tracking_uri(tracking_uri or "")
    runs = tracking.search_runs(uri, experiment)
    parents = [r for r in runs if r["tags"].get(tracking.SWEEP_TAG) == "parent"]
    parent = max(parents, key=lambda r: r["start_time"] or 0) if parents else None
    if parent is not None:
        trials = [r for r in runs if r["tags"].get(tracking.PARENT_TAG) == parent["run_id"]]
    else:
        trials = runs
    finished = [r for r in trials if r["status"] == "FINISHED"]
    if not finished:
        scope = f"sweep run {parent['run_id']} of experiment {experiment!r}" if parent else f"experiment {experiment!r}"
        statuses = sorted({r["status"] for r in trials})
        raise UserError(f"{scope} has no FINISHED runs to analyze ({len(trials)} runs; statuses: "
                        f"{', '.join(statuses) or 'none'})")
    out_dir = out or os.path.join("lejepa-analysis", re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment))
    print(f"analyze: {len(finished)} finished trials of {experiment!r}"
          + (f" (sweep run {parent['run_id']})" if parent else "") + f" -> {out_dir}", file=sys.stderr)
    result = analyze(finished, out_dir, title=experiment)
    result.update({"experiment": experiment, "tracking_uri": redact_uri(uri),
                   "parent_run_id": parent["run_id"] if parent else None,
                   "unfinished_skipped": len(trials) - len(finished)})
    _write_json(result)
    result["logged_to"] = None
    if parent is not None:
        files = [result["report"], result["json"], *result["plots"].values()]
        artifact_uri = tracking.log_artifacts_to_run(uri, parent["run_id"], files, artifact_path="analysis")
        result["logged_to"] = f"{redact_uri(artifact_uri)}/analysis"
    return result
