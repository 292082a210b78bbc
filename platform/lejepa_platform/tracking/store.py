"""The MLflow store: which URI, the client, its limits and tags, and the lookups every other
tracking module needs (a run by id, an experiment by name, created when missing).

Everything goes through an explicit `MlflowClient(uri)`: the global `mlflow.set_experiment`
exports MLFLOW_EXPERIMENT_ID, which Ray's MLflow helpers then prefer over an explicit experiment
name, sending runs silently to the wrong experiment. `mlflow` is imported lazily, inside the
functions that need it, so that ranks and tests that never touch a store do not pay for the import.

A store that cannot be reached, or that refuses to record something (a server whose artifact
destination fails answers HTTP 500), raises `TrackingError`: one line naming the store and the
cause, instead of a traceback from deep inside MLflow's HTTP client.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import time
from typing import Any

from lejepa_platform.batching import chunks
from lejepa_platform.errors import TrackingError, UserError
from lejepa_platform.names import safe_name
from lejepa_platform.redact import redact_params, redact_uri

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


def prepare_params(params: dict[str, Any], limit: int = PARAM_VALUE_LIMIT) -> dict[str, str]:
    """Redacted, stringified and length-capped values: exactly what a store receives
    (tags go through here too, with `TAG_VALUE_LIMIT`)."""
    return {str(k): _cap(_stringify(v), limit) for k, v in redact_params(dict(params)).items()}


def _stringify(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def _cap(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


_ANSWERS = ("RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS")
"""MLflow error codes that are a working store's answer (no such run, already there), not a failure."""
_ACTIONS = {"log_artifact": "store an artifact", "log_artifacts": "store artifacts", "log_batch": "record values",
            "download_artifacts": "read an artifact", "list_artifacts": "list artifacts",
            "set_terminated": "set the run's status", "update_run": "set the run's status",
            "get_metric_history": "read a metric"}
_ARTIFACT_HINT = ("the server writes artifacts to its --artifacts-destination and its log says why: check that the "
                  "bucket exists, that the server has credentials for it and that boto3 is installed where it runs")


class _Client:
    """An MlflowClient whose failures to reach or write the store raise `TrackingError`."""

    def __init__(self, uri: str) -> None:
        import mlflow

        self._client, self._uri = mlflow.MlflowClient(tracking_uri=uri), uri

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._client, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            except Exception as err:
                if not _is_failure(err):
                    raise
                raise TrackingError(_failure_message(self._uri, name, err)) from None

        return call


def open_client(uri: str) -> _Client:
    """The MLflow client for `uri`; its calls raise TrackingError when the store fails."""
    return _Client(uri)


def _is_failure(err: Exception) -> bool:
    """A failure to reach or write the store (not a bug, not a store's answer such as "no such run")."""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return getattr(err, "error_code", "") not in _ANSWERS
    return isinstance(err, OSError) or type(err).__module__.split(".")[0] in ("botocore", "boto3")


def _failure_message(uri: str, method: str, err: Exception) -> str:
    """One line: which store, what it could not do, and why."""
    action = _ACTIONS.get(method, method.replace("_", " "))
    cause = _describe_failure(err)
    hint = f"; {_ARTIFACT_HINT}" if "artifact" in method and re.search(r"HTTP 5\d\d", cause) else ""
    return f"MLflow store {redact_uri(uri)} could not {action}: {cause}{hint}"


def _describe_failure(err: BaseException) -> str:
    """The cause of a failed store call in a few words (MLflow's own message is a page of URLs)."""
    text = " ".join(str(err).split())
    status = re.search(r"too many (\d{3}) error responses", text)
    if status:
        return f"HTTP {status.group(1)} (retried)"
    for pattern, words in ((r"Connection refused", "connection refused"),
                           (r"[Tt]imed? ?out|timeout", "no answer (timed out)"),
                           (r"Name or service not known|Could not resolve|getaddrinfo failed", "unknown host")):
        if re.search(pattern, text):
            return words
    return redact_uri(text)[:300] or type(err).__name__


def wait_for_server(uri: str, wait_s: float) -> None:
    """Return once the tracking server at `uri` answers (its /health); TrackingError once it has
    not answered for `wait_s` seconds. Stores that are not servers (SQLite files) return at once."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    verify = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH") or \
        os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() not in ("true", "1")
    deadline = time.monotonic() + wait_s
    while True:
        try:
            status = requests.get(f"{uri.rstrip('/')}/health", timeout=5, verify=verify).status_code
            if status < 500:
                return
            cause = f"HTTP {status}"
        except requests.RequestException as err:
            cause = _describe_failure(err)
        left = deadline - time.monotonic()
        if left <= 0:
            raise TrackingError(f"MLflow server {redact_uri(uri)} did not answer for {wait_s:g} s: {cause}")
        time.sleep(min(2.0, left))


def _is_missing(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def open_existing_store(uri: str, looking_for: str) -> _Client:
    """A client of a store that must exist already: a lookup does not create a SQLite store (MLflow
    would, logging its schema set-up on stderr); UserError "`looking_for`: there is no MLflow store"."""
    db_path = _sqlite_path(uri)
    if db_path is not None and not db_path.exists():
        raise UserError(f"{looking_for}: there is no MLflow store at {redact_uri(uri)}")
    return open_client(uri)


def open_run(uri: str, run_id: str) -> tuple[_Client, Any]:
    """A client of the store at `uri` and the run `run_id` in it; UserError when there is none."""
    client = open_existing_store(uri, f"no MLflow run with id {run_id!r}")
    return client, get_run(client, uri, run_id)


def get_run(client, uri: str, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as err:
        if _is_missing(err):
            raise UserError(f"no MLflow run with id {run_id!r} in {redact_uri(uri)}") from None
        raise


def metric_points(metrics: dict[str, float], stamp_ms: int, step: int) -> list[Any]:
    """One step's metrics as MLflow `Metric`s with the same stamp."""
    from mlflow.entities import Metric

    return [Metric(key, float(value), int(stamp_ms), int(step)) for key, value in metrics.items()]


def send_metrics(client, run_id: str, metrics: dict[str, float], step: int) -> None:
    """One step's metrics, stamped now, in as few requests as MLflow accepts."""
    for chunk in chunks(metric_points(metrics, int(time.time() * 1000), step), METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)


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
