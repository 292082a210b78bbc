"""The MLflow store: which URI, the client, its limits and tags, and the lookups every other
tracking module needs (a run by id, an experiment by name, created when missing).

Everything goes through an explicit `MlflowClient(uri)`: the global `mlflow.set_experiment`
exports MLFLOW_EXPERIMENT_ID, which Ray's MLflow helpers then prefer over an explicit experiment
name, sending runs silently to the wrong experiment. `mlflow` is imported lazily, inside the
functions that need it, so that ranks and tests that never touch a store do not pay for the import.
"""

from __future__ import annotations

import hashlib
import os
import pathlib

from lejepa_platform.errors import UserError
from lejepa_platform.names import safe_name
from lejepa_platform.redact import redact_uri

PARAM_VALUE_LIMIT = 500
"""Longest param value sent: older MLflow servers refuse more (the full config is an artifact)."""
TAG_VALUE_LIMIT = 5000
"""Longest tag value sent: older MLflow servers refuse more."""
PARAMS_PER_BATCH = 100
"""MLflow's limit on params (and on tags) in one log_batch request."""
METRICS_PER_BATCH = 1000
"""MLflow's limit on metrics in one log_batch request."""
STATUSES = ("FINISHED", "FAILED", "KILLED")
PARENT_TAG = "mlflow.parentRunId"
"""MLflow's tag nesting a run under another (the UI shows sweep trials under the sweep's run)."""
SWEEP_TAG = "lejepa.sweep"
"""Set to "parent" on a sweep's own run; `lejepa analyze` looks for it."""


def resolve_tracking_uri(uri: str = "") -> str:
    """The tracking URI to use: `uri`, else MLFLOW_TRACKING_URI, else a SQLite file in the cwd.

    Relative SQLite paths are made absolute here, because Ray workers run in another working
    directory and would otherwise open a different (empty) database. Nothing is set globally.
    """
    chosen = uri or os.environ.get("MLFLOW_TRACKING_URI", "") or f"sqlite:///{pathlib.Path.cwd() / 'mlflow.db'}"
    db_path = _sqlite_path(chosen)
    if db_path is not None and not db_path.is_absolute():
        return f"sqlite:///{db_path.resolve()}"
    return chosen


def _sqlite_path(uri: str) -> pathlib.Path | None:
    """The database file of a `sqlite:///path` URI (relative or absolute), None for other URIs."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return pathlib.Path(path) if path and path != ":memory:" else None


def open_client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def _is_missing(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def get_run(client, uri: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if _is_missing(err):
            raise UserError(f"no MLflow run with id {run_id!r} in {redact_uri(uri)}") from None
        raise


def _artifact_location(uri: str, experiment: str) -> str | None:
    """For SQLite stores: artifacts next to the database, not in the cwd of whichever process
    happened to create the experiment (a Ray worker's cwd is a temporary session directory)."""
    db_path = _sqlite_path(uri)
    if db_path is None:
        return None
    slug = safe_name(experiment)[:60]
    digest = hashlib.sha1(experiment.encode()).hexdigest()[:8]
    return (db_path.resolve().parent / "mlruns" / f"{slug}-{digest}").as_uri()


def experiment_id_for(client, uri: str, name: str) -> str:
    """Id of the experiment `name`, created if missing (safe when several trials race to create it)."""
    from mlflow.exceptions import MlflowException

    if not name:
        raise UserError("the MLflow experiment name must not be empty")
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(uri, name))
        except MlflowException as err:
            if getattr(err, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise UserError(f"MLflow experiment {name!r} is deleted; restore it (`mlflow experiments restore`) "
                        "or choose another name")
    return experiment.experiment_id
