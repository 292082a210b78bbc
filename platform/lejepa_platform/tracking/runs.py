"""Existing MLflow runs by id or experiment: read them back (info, metric history, artifacts) and
add to them without touching their status (a later `lejepa eval`, a sweep's analysis)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from lejepa_platform.errors import TrackingError, UserError
from lejepa_platform.redact import redact_uri
from lejepa_platform.tracking.store import PARENT_TAG, open_existing_store, open_run, send_metrics


def _run_dict(run) -> dict[str, Any]:
    info, data = run.info, run.data
    return {"run_id": info.run_id, "name": info.run_name, "status": info.status,
            "experiment_id": info.experiment_id, "params": dict(data.params), "metrics": dict(data.metrics),
            "tags": dict(data.tags), "start_time": info.start_time, "end_time": info.end_time,
            "artifact_uri": info.artifact_uri}


def find_run(uri: str, run_id: str) -> dict[str, Any]:
    """One run: info, params, latest metrics, tags, artifact URI (times in ms since the epoch)."""
    return _run_dict(open_run(uri, run_id)[1])


def download_artifact(uri: str, run_id: str, artifact_path: str, dst: str) -> str:
    """Copy the artifact file or folder `artifact_path` of a run into `dst`; returns the local path."""
    from mlflow.exceptions import MlflowException

    client, _ = open_run(uri, run_id)
    os.makedirs(dst, exist_ok=True)
    try:
        return client.download_artifacts(run_id, artifact_path, dst)
    except (MlflowException, OSError, TrackingError) as err:  # a store that is down fails the listing below
        have = [f.path for f in client.list_artifacts(run_id)]
        raise UserError(f"run {run_id} has no artifact {artifact_path!r} ({type(err).__name__}); "
                        f"top-level artifacts: {', '.join(have) or 'none'}") from None


def search_runs(uri: str, experiment: str, *, parent_run_id: str | None = None) -> list[dict[str, Any]]:
    """All active runs of `experiment` (only the children of `parent_run_id` if given), oldest first."""
    client = open_existing_store(uri, f"no MLflow experiment {experiment!r}")
    found = client.get_experiment_by_name(experiment)
    if found is None or found.lifecycle_stage == "deleted":
        names = sorted(e.name for e in client.search_experiments())
        raise UserError(f"no MLflow experiment {experiment!r} in {redact_uri(uri)}; "
                        f"experiments: {', '.join(names) or 'none'}")
    if parent_run_id and not re.fullmatch(r"[A-Za-z0-9_-]+", parent_run_id):
        raise UserError(f"run id {parent_run_id!r} is not allowed: letters, digits, '_' and '-' only")
    query = f"tags.`{PARENT_TAG}` = '{parent_run_id}'" if parent_run_id else ""
    runs, token = [], None
    while True:
        page = client.search_runs([found.experiment_id], filter_string=query, max_results=1000,
                                  order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(_run_dict(run) for run in page)
        token = page.token
        if not token:
            return runs


def metric_history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) sorted by step. A step logged twice (steps replayed after a resume from an
    earlier checkpoint) keeps its most recent value."""
    client, _ = open_run(uri, run_id)
    logged = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return last_per_step((m.step, m.value) for m in logged)


def last_per_step(points: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    """(step, value) pairs in logging order -> sorted by step, the last value of each step kept."""
    last = dict(points)
    return [(step, last[step]) for step in sorted(last)]


def log_artifacts_to_run(uri: str, run_id: str, paths: Iterable[str], artifact_path: str | None = None) -> str:
    """Attach files to an existing run without touching its status; returns the run's artifact URI."""
    client, run = open_run(uri, run_id)
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"artifact {path!r} is not a file")
        client.log_artifact(run_id, path, artifact_path)
    return run.info.artifact_uri


def log_metrics_to_run(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Add metrics to an existing run without touching its status (e.g. a later `lejepa eval`)."""
    client, _ = open_run(uri, run_id)
    send_metrics(client, run_id, metrics, step)
