"""Sweep analysis: power-law fits recover planted parameters, Spearman matches a hand count, the report and
plots are written, and `lejepa analyze` attaches them to a real sweep parent run in MLflow."""

import json
import math
import os

import numpy as np
import pytest

from lejepa_platform import tracking
from lejepa_platform.errors import UserError
from lejepa_platform.sweep.analysis import analyze, analyze_from_cli, trial_table
from lejepa_platform.sweep.fits import fit_power_law, spearman

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")]

PLANTED = {"a": 5.0, "b": 0.35, "c": 0.8}
X12 = np.geomspace(1.0, 1000.0, 12)  # 12 points over 3 decades


def _planted(x, a=PLANTED["a"], b=PLANTED["b"], c=PLANTED["c"]):
    return a * np.power(x, -b) + c


# --- fit_power_law --------------------------------------------------------------------------


def test_saturating_fit_recovers_planted_parameters_from_noisy_points():
    rng = np.random.default_rng(7)
    y = _planted(X12) * np.exp(rng.normal(0.0, 0.02, X12.size))  # 2 % multiplicative noise
    fit = fit_power_law(X12, y)
    assert fit.kind == "saturating" and fit.n_points == 12
    for name in ("a", "b", "c"):
        err = getattr(fit, f"{name}_err")
        assert 0 < err < 0.1 * PLANTED[name]  # informative, not a blanket interval
        assert abs(getattr(fit, name) - PLANTED[name]) < 3 * err


def test_saturating_fit_errors_are_calibrated_over_many_noise_draws():
    inside, estimates = 0, []
    for seed in range(200):
        y = _planted(X12) * np.exp(np.random.default_rng(seed).normal(0.0, 0.02, X12.size))
        fit = fit_power_law(X12, y)
        inside += abs(fit.b - PLANTED["b"]) < 2 * fit.b_err
        estimates.append(fit.b)
    assert 0.88 <= inside / 200 <= 0.99  # nominal 95 % for +-2 sigma
    assert abs(np.mean(estimates) - PLANTED["b"]) < 0.005


def test_saturating_fit_is_exact_without_noise_even_at_parameter_count_scale():
    x = np.geomspace(1e6, 1e9, 9)
    a = 3.0 * 1e6 ** 0.2
    fit = fit_power_law(x, _planted(x, a=a, b=0.2, c=1.5))
    assert fit.b == pytest.approx(0.2, abs=1e-8)
    assert fit.a == pytest.approx(a, rel=1e-6)
    assert fit.c == pytest.approx(1.5, abs=1e-8)
    np.testing.assert_allclose(fit.predict(x), _planted(x, a=a, b=0.2, c=1.5), rtol=1e-9)


def test_increasing_curve_fits_with_negative_amplitude():
    x = np.geomspace(1e3, 1e7, 6)
    acc = 0.9 - 0.6 * np.power(x / 1e3, -0.3)
    fit = fit_power_law(x, acc)
    assert fit.kind == "saturating"
    assert fit.b == pytest.approx(0.3, abs=1e-7) and fit.c == pytest.approx(0.9, abs=1e-7) and fit.a < 0


def test_pure_power_law_with_fewer_than_four_distinct_x():
    x = np.array([10.0, 100.0, 1000.0, 1000.0])
    fit = fit_power_law(x, 3.0 * x ** -0.2)
    assert fit.kind == "pure" and fit.n_points == 4 and fit.c == 0.0
    assert fit.a == pytest.approx(3.0, rel=1e-12) and fit.b == pytest.approx(0.2, rel=1e-12)
    # Two points: an exact line through them, no degree of freedom left for an error.
    two = fit_power_law([2.0, 8.0], [4.0, 1.0])
    assert two.b == pytest.approx(1.0) and two.a == pytest.approx(8.0)
    assert math.isnan(two.b_err) and two.to_dict()["b_err"] is None


def test_pure_fit_error_matches_ordinary_least_squares_formula():
    rng = np.random.default_rng(3)
    x = np.array([1.0, 10.0, 100.0])
    y = 2.0 * x ** -0.5 * np.exp(rng.normal(0, 0.05, 3))
    fit = fit_power_law(x, y)
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    s2 = np.sum((ly - (intercept + slope * lx)) ** 2) / (3 - 2)
    assert fit.b == pytest.approx(-slope) and fit.a == pytest.approx(math.exp(intercept))
    assert fit.b_err == pytest.approx(math.sqrt(s2 / np.sum((lx - lx.mean()) ** 2)))


@pytest.mark.parametrize("x, y", [([1, 2, 3], [1, 2]), ([1, 1, 1], [1, 2, 3]), ([0, 1, 2], [1, 2, 3]),
                                  ([1, 2, 3], [1, -2, 3]), ([1, 2, float("nan")], [1, 2, 3])])
def test_fit_rejects_unusable_points(x, y):
    with pytest.raises(UserError):
        fit_power_law(x, y)


# --- spearman -------------------------------------------------------------------------------


def test_spearman_with_ties_is_the_hand_computed_rank_correlation():
    # y's two 7s share rank 3.5: centred ranks x (-2, -1, 0, 1, 2), y (-2, -1, 0.5, 2, 0.5),
    # so rho = 8 / sqrt(10 * 9.5).
    x, y = [1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 6.0, 7.0, 8.0, 7.0]
    assert spearman(x, y) == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert spearman(x, y) != pytest.approx(float(np.corrcoef(x, y)[0, 1]))  # ranks, not values


def test_spearman_monotone_and_constant_cases():
    x = np.arange(8.0)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -x ** 3) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, np.ones(8)))
    with pytest.raises(UserError):
        spearman([1.0], [2.0])


# --- trial table and analyze ----------------------------------------------------------------


def _run(i: int, n_params: float, lam: float, *, flops: bool = True, accuracy: bool = True) -> dict:
    loss = float(_planted(n_params / 1e5))
    metrics = {"loss/total": loss, "loss/prediction": 0.9 * loss, "loss/sigreg": 0.1 * loss,
               "model/params": n_params, "probe/online_acc": 0.5 + 0.01 * i}
    if accuracy:
        metrics["eval/pretrained/linear"] = 1.0 / loss
    if flops:
        metrics["compute/flops"] = 6.0 * n_params * 64 * 100
    params = {"model.backbone": f"vit_{i}", "loss.num_slices": "256", "loss.lam": str(lam),
              "data.batch_size": "64", "train.steps": "100", "train.name": f"trial_{i}", "train.lr": "0.001"}
    return {"run_id": f"r{i}", "name": f"trial_{i}", "status": "FINISHED", "params": params, "metrics": metrics,
            "tags": {}, "start_time": 1_000_000, "end_time": 1_000_000 + 1500 * (i + 1)}


def _runs(n: int = 6, **kwargs) -> list[dict]:
    sizes = np.geomspace(1e5, 1e8, n)
    return [_run(i, float(s), 0.02 if i % 2 else 0.05, **kwargs) for i, s in enumerate(sizes)]


def test_trial_table_columns_numbers_and_compute_estimate():
    runs = _runs(4)
    runs[1]["metrics"].pop("compute/flops")
    rows = trial_table(runs)
    assert [r["run_id"] for r in rows] == ["r0", "r1", "r2", "r3"]
    assert rows[0]["loss.num_slices"] == 256 and rows[1]["loss.lam"] == 0.02 and rows[0]["model.backbone"] == "vit_0"
    assert "train.lr" not in rows[0]  # same in every trial and not of interest
    assert "train.name" not in rows[0]  # differs, but per trial by design
    assert rows[1]["compute/flops"] == pytest.approx(6.0 * runs[1]["metrics"]["model/params"] * 64 * 100)
    assert rows[1]["compute/source"] == "estimated" and rows[0]["compute/source"] == "logged"
    assert rows[2]["wall_time_s"] == pytest.approx(4.5)
    assert rows[3]["loss/sigreg"] == pytest.approx(0.1 * runs[3]["metrics"]["loss/total"])


def test_trial_table_adds_varying_params():
    runs = _runs(3)
    for i, run in enumerate(runs):
        run["params"]["train.lr"] = str(10.0 ** -i)
    assert [r["train.lr"] for r in trial_table(runs)] == [1.0, 0.1, 0.01]


def test_analyze_writes_fits_spearman_plots_and_report(tmp_path):
    result = analyze(_runs(6), str(tmp_path), title="scaling")
    assert result["trials"] == 6 and result["accuracy_metric"] == "eval/pretrained/linear"
    loss_fit = result["fits"]["loss_vs_params"]
    assert loss_fit["kind"] == "saturating" and loss_fit["n_points"] == 6
    # The loss was planted as 5 * (N / 1e5)^-0.35 + 0.8: exact recovery, a in units of N.
    assert loss_fit["b"] == pytest.approx(0.35, abs=1e-7) and loss_fit["c"] == pytest.approx(0.8, abs=1e-7)
    assert loss_fit["a"] == pytest.approx(5.0 * 1e5 ** 0.35, rel=1e-5)
    assert "note" not in loss_fit
    # 1 / loss keeps rising over the whole range: no saturation, which the fit must say.
    acc_fit = result["fits"]["accuracy_vs_compute"]
    assert acc_fit["kind"] == "saturating" and acc_fit["b"] < 0.02 and "no saturation" in acc_fit["note"]
    assert result["spearman"] == {"x": "loss/total", "y": "eval/pretrained/linear", "value": pytest.approx(-1.0),
                                  "n": 6}
    assert set(result["plots"]) == {"loss_vs_params", "accuracy_vs_compute", "labelfree_vs_accuracy"}
    for path in result["plots"].values():
        with open(path, "rb") as fh:
            head = fh.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(path) > 5000
    report = open(result["report"]).read()
    assert report.startswith("# Sweep analysis: scaling")
    assert "| run_id | name | model.backbone |" in report
    assert all(f"| r{i} | trial_{i} | vit_{i} |" in report for i in range(6))
    assert "![loss_vs_params](loss_vs_params.png)" in report
    assert json.load(open(result["json"]))["fits"]["loss_vs_params"]["b"] == pytest.approx(0.35, abs=1e-7)


def test_analyze_without_offline_eval_uses_online_probe_and_says_so(tmp_path):
    result = analyze(_runs(3, accuracy=False), str(tmp_path))
    assert result["accuracy_metric"] == "probe/online_acc"
    assert result["fits"]["loss_vs_params"]["kind"] == "pure"  # 3 sizes only
    assert result["spearman"]["value"] == pytest.approx(-1.0)
    assert "optimistic" in open(result["report"]).read()


def test_analyze_skips_what_it_cannot_fit(tmp_path):
    runs = _runs(1)
    for run in runs:
        del run["metrics"]["probe/online_acc"], run["metrics"]["eval/pretrained/linear"]
    result = analyze(runs, str(tmp_path))
    assert result["accuracy_metric"] is None
    assert all("skipped" in fit for fit in result["fits"].values())
    assert "skipped" in result["spearman"] and set(result["plots"]) == {"loss_vs_params"}
    with pytest.raises(UserError):
        analyze([], str(tmp_path))


# --- analyze_from_cli on a real MLflow store ------------------------------------------------


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    """A SQLite store with one finished sweep parent run, 4 finished children and a failed one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        uri = f"sqlite:///{tmp_path_factory.mktemp('sweep') / 'mlflow.db'}"
        parent = tracking.MLflowTracker.start(uri, "scaling", run_name="sweep", tags={tracking.SWEEP_TAG: "parent"})
        for i, run in enumerate(_runs(4)):
            child = tracking.MLflowTracker.start(uri, "scaling", run_name=run["name"], parent_run_id=parent.run_id)
            child.log_params(run["params"])
            child.log_metrics(run["metrics"], step=100)
            child.finish()
        failed = tracking.MLflowTracker.start(uri, "scaling", run_name="broken", parent_run_id=parent.run_id)
        failed.log_metrics({"loss/total": 99.0}, step=1)
        failed.finish("FAILED")
        tracking.MLflowTracker.start(uri, "empty").finish("FAILED")
        parent.finish()
        yield uri, parent.run_id


def test_analyze_from_cli_logs_report_to_the_sweep_parent(sweep_store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri, parent_id = sweep_store
    before = tracking.find_run(uri, parent_id)
    result = analyze_from_cli("scaling", tracking_uri=uri, out=str(tmp_path / "out"))
    assert result["parent_run_id"] == parent_id and result["trials"] == 4 and result["unfinished_skipped"] == 1
    assert sorted(r["name"] for r in result["table"]) == ["trial_0", "trial_1", "trial_2", "trial_3"]
    assert result["fits"]["loss_vs_params"]["b"] == pytest.approx(0.35, abs=1e-6)
    after = tracking.find_run(uri, parent_id)
    assert before["status"] == "FINISHED"
    assert (after["status"], after["end_time"]) == (before["status"], before["end_time"])
    local = tracking.download_artifact(uri, parent_id, "analysis", str(tmp_path / "dl"))
    assert sorted(os.listdir(local)) == ["accuracy_vs_compute.png", "analysis.json", "labelfree_vs_accuracy.png",
                                         "loss_vs_params.png", "report.md"]
    assert open(os.path.join(local, "report.md")).read() == open(result["report"]).read()


def test_analyze_from_cli_user_errors(sweep_store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri, _ = sweep_store
    with pytest.raises(UserError, match="no MLflow experiment 'nope'.*scaling"):
        analyze_from_cli("nope", tracking_uri=uri, out=str(tmp_path))
    with pytest.raises(UserError, match="no FINISHED runs.*FAILED"):
        analyze_from_cli("empty", tracking_uri=uri, out=str(tmp_path))

