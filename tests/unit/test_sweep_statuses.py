"""How a sweep closes its trials' MLflow runs once Tune is done: a trial the scheduler stopped is
KILLED whatever its dying process managed to write; a trial that failed by itself stays FAILED."""

import pytest

from lejepa_platform.sweep.tune import close_stopped_trials
from lejepa_platform.tracking import MLflowTracker, search_runs

pytestmark = [pytest.mark.unit, pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow")]


def test_stopped_trials_end_killed_and_failed_trials_stay_failed(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = MLflowTracker.start(uri, "s", run_name="sweep")
    written = {"t_running": None, "t_stopped_raised": "FAILED", "t_broken": "FAILED", "t_done": "FINISHED"}
    for name, status in written.items():
        child = MLflowTracker.start(uri, "s", run_name=name, parent_run_id=parent.run_id)
        if status:
            child.finish(status)
    children = search_runs(uri, "s", parent_run_id=parent.run_id)

    # Tune ended every trial but t_broken without an error of its own
    close_stopped_trials(uri, "s", children, ended_cleanly={"t_running", "t_stopped_raised", "t_done"})

    after = {r["name"]: r["status"] for r in search_runs(uri, "s", parent_run_id=parent.run_id)}
    assert after == {"t_running": "KILLED", "t_stopped_raised": "KILLED", "t_broken": "FAILED", "t_done": "FINISHED"}
