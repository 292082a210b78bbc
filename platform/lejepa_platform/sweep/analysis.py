"""Sweep report: trials from MLflow -> table -> power-law fits, Spearman, plots, markdown report.

The maths lives in `sweep/fits.py` (pure functions of numbers); this module only gathers the
points, draws and writes. Runs are read through `tracking` (the only package that talks to MLflow).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import numpy as np

from lejepa_platform import tracking
from lejepa_platform.console import say
from lejepa_platform.errors import UserError
from lejepa_platform.names import safe_name
from lejepa_platform.redact import redact_uri
from lejepa_platform.sweep.fits import B_MAX, B_MIN, SATURATING_MIN_X, PowerLawFit, finite_or_none, fit_power_law, spearman

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


def _fit_or_reason(rows: list[dict], x_key: str, y_key: str | None) -> tuple[dict, PowerLawFit | None]:
    if y_key is None:
        return {"skipped": "no accuracy metric was logged"}, None
    x, y = _points(rows, x_key, y_key)
    if np.unique(x).size < 2:
        return {"skipped": f"needs trials with at least 2 distinct positive {x_key} values and a {y_key}; "
                           f"found {np.unique(x).size}"}, None
    fit = fit_power_law(x, y)
    entry = {"x": x_key, "y": y_key, **fit.to_dict()}
    if fit.b_at_bound:
        entry["note"] = (f"b at the edge of the searched range [{B_MIN:g}, {B_MAX:g}]: the points show no "
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
              "accuracy_metric": accuracy, "table": [{k: finite_or_none(v) for k, v in r.items()} for r in rows],
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
    return {"x": label_free, "y": accuracy, "value": finite_or_none(value), "n": len(pairs)}


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


def analyze_from_cli(experiment: str, *, tracking_uri: str | None, out: str | None,
                     quiet: bool = False) -> dict[str, Any]:
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
    out_dir = out or os.path.join("lejepa-analysis", safe_name(experiment))
    say(quiet, f"analyze: {len(finished)} finished trials of {experiment!r}"
        + (f" (sweep run {parent['run_id']})" if parent else "") + f" -> {out_dir}")
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
