"""Run tracking: the one module that talks to MLflow.

Training code sees only the `Tracker` interface. Rank 0 gets an `MLflowTracker`, every other rank
a `NullTracker`, and tests an `InMemoryTracker`, so no `if rank == 0` is scattered around and the
loop runs without an MLflow store. Everything goes through an explicit `MlflowClient(uri)`: the
global `mlflow.set_experiment` exports MLFLOW_EXPERIMENT_ID, which Ray's MLflow helpers then prefer
over an explicit experiment name, sending runs silently to the wrong experiment.

`mlflow` is imported lazily, inside the functions that need it, so that ranks and tests that never
touch a store do not pay for the import.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

from lejepa_platform.errors import UserError
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
_ENV_PACKAGES = ("ray", "torch", "timm", "mlflow")


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


# --------------------------------------------------------------------------------------------
# The interface and the two store-less trackers.


class Tracker(Protocol):
    """What the training loop may do with a run; implemented by the three trackers below.

    `history(key)` reads a metric back as (step, value) sorted by step, a replayed step keeping
    its latest value (what a resumed run checks before re-logging); [] when nothing is stored.
    """

    run_id: str | None

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...

    def log_dict(self, obj: dict, name: str) -> None: ...

    def finish(self, status: str = "FINISHED") -> None: ...

    def history(self, key: str) -> list[tuple[int, float]]: ...


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


def _check_status(status: str) -> str:
    if status not in STATUSES:
        raise UserError(f"run status {status!r} is not allowed: must be one of {', '.join(STATUSES)}")
    return status


class NullTracker:
    """Accepts everything and records nothing: what non-zero ranks get."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: dict, name: str) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        _check_status(status)

    def history(self, key: str) -> list[tuple[int, float]]:
        return []


class InMemoryTracker:
    """Keeps what a store would receive (same redaction and stringification) in plain containers."""

    def __init__(self, run_id: str = "in-memory") -> None:
        self.run_id: str | None = run_id
        self.params: dict[str, str] = {}
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self.dicts: dict[str, dict] = {}
        self.status: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        self.params.update(prepare_params(params))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, []).append((int(step), float(value)))

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(prepare_params(tags, TAG_VALUE_LIMIT))

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if not os.path.exists(path):
            raise UserError(f"artifact {path!r} does not exist")
        self.artifacts.append((path, artifact_path))

    def log_dict(self, obj: dict, name: str) -> None:
        self.dicts[name] = json.loads(json.dumps(obj, default=str))

    def finish(self, status: str = "FINISHED") -> None:
        self.status = _check_status(status)

    def history(self, key: str) -> list[tuple[int, float]]:
        return _last_per_step(self.metrics.get(key, []))


# --------------------------------------------------------------------------------------------
# MLflow.


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def _is_missing(err: Exception) -> bool:
    return getattr(err, "error_code", "") == "RESOURCE_DOES_NOT_EXIST"


def _get_run(client, uri: str, run_id: str):
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
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment)[:60]
    digest = hashlib.sha1(experiment.encode()).hexdigest()[:8]
    return (db_path.resolve().parent / "mlruns" / f"{slug}-{digest}").as_uri()


def _experiment_id(client, uri: str, name: str) -> str:
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


class MLflowTracker:
    """One MLflow run, written through an explicit client; create it with `MLflowTracker.start`.

    Also a context manager: leaving the block finishes the run as FINISHED, FAILED (exception)
    or KILLED (KeyboardInterrupt).
    """

    def __init__(self, client, tracking_uri: str, experiment_id: str, run_id: str) -> None:
        self._client = client
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.run_id: str | None = run_id

    @classmethod
    def start(cls, uri: str, experiment: str, *, run_name: str | None = None, run_id: str | None = None,
              parent_run_id: str | None = None, tags: dict | None = None) -> MLflowTracker:
        """Create a run in `experiment` (created if missing), or resume `run_id` (status back to RUNNING).

        `parent_run_id` nests the run under a parent (sweep trials under the sweep's run).
        """
        client = _client(uri)
        all_tags = dict(tags or {})
        if parent_run_id:
            _get_run(client, uri, parent_run_id)
            all_tags[PARENT_TAG] = parent_run_id
        if run_id:
            run = _get_run(client, uri, run_id)
            client.update_run(run_id, status="RUNNING")
            tracker = cls(client, uri, run.info.experiment_id, run_id)
            tracker.set_tags(all_tags)
            return tracker
        experiment_id = _experiment_id(client, uri, experiment)
        run = client.create_run(experiment_id, tags=prepare_params(all_tags, TAG_VALUE_LIMIT), run_name=run_name or None)
        return cls(client, uri, experiment_id, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params in batches. On a resumed run, values already logged are skipped and changed
        ones (MLflow params are immutable) are kept as `resumed.<key>` tags and reported on stderr."""
        from mlflow.entities import Param

        prepared = prepare_params(params)
        existing = self._client.get_run(self.run_id).data.params
        changed = {k: v for k, v in prepared.items() if k in existing and existing[k] != v}
        new = [Param(k, v) for k, v in prepared.items() if k not in existing]
        for chunk in _chunks(new, PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, params=chunk)
        if changed:
            print(f"tracking: run {self.run_id} already has different values for {', '.join(sorted(changed))}; "
                  "the new values are recorded as resumed.* tags", file=sys.stderr)
            self.set_tags({f"resumed.{k}": v for k, v in changed.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]
        for chunk in _chunks(batch, METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=chunk)

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(k, v) for k, v in prepare_params(tags, TAG_VALUE_LIMIT).items()]
        for chunk in _chunks(batch, PARAMS_PER_BATCH):
            self._client.log_batch(self.run_id, tags=chunk)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if not os.path.exists(path):
            raise UserError(f"artifact {path!r} does not exist")
        if os.path.isdir(path):
            self._client.log_artifacts(self.run_id, path, artifact_path)
        else:
            self._client.log_artifact(self.run_id, path, artifact_path)

    def log_dict(self, obj: dict, name: str) -> None:
        """Write `obj` as JSON to the artifact file `name` (e.g. "config.json")."""
        with tempfile.TemporaryDirectory() as tmp:
            target = pathlib.Path(tmp) / pathlib.PurePosixPath(name).name
            target.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            parent = str(pathlib.PurePosixPath(name).parent)
            self._client.log_artifact(self.run_id, str(target), None if parent == "." else parent)

    def finish(self, status: str = "FINISHED") -> None:
        self._client.set_terminated(self.run_id, _check_status(status))

    def history(self, key: str) -> list[tuple[int, float]]:
        return metric_history(self.tracking_uri, self.run_id, key)

    def __enter__(self) -> MLflowTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def log_artifacts_to_run(uri: str, run_id: str, paths: Iterable[str], artifact_path: str | None = None) -> str:
    """Attach files to an existing run without touching its status; returns the run's artifact URI."""
    client = _client(uri)
    run = _get_run(client, uri, run_id)
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"artifact {path!r} is not a file")
        client.log_artifact(run_id, path, artifact_path)
    return run.info.artifact_uri


def log_metrics_to_run(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    """Add metrics to an existing run without touching its status (e.g. a later `lejepa eval`)."""
    from mlflow.entities import Metric

    client = _client(uri)
    _get_run(client, uri, run_id)
    now = int(time.time() * 1000)
    batch = [Metric(key, float(value), now, int(step)) for key, value in metrics.items()]
    for chunk in _chunks(batch, METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=chunk)


def list_artifacts(uri: str, run_id: str, path: str | None = None) -> list[str]:
    """Paths of a run's artifacts directly under `path` (top level by default)."""
    client = _client(uri)
    _get_run(client, uri, run_id)
    return sorted(f.path for f in client.list_artifacts(run_id, path))


# --------------------------------------------------------------------------------------------
# Environment tags.


def run_environment_tags() -> dict[str, str]:
    """Code version, library versions and hardware, so a run can be reproduced (no hostname)."""
    tags = {"mlflow.source.git.commit": _git_commit(), "version.python": platform.python_version()}
    for package in _ENV_PACKAGES:
        try:
            tags[f"version.{package}"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            tags[f"version.{package}"] = "not installed"
    tags["hardware.cpu_count"] = str(os.cpu_count() or 0)
    gpus = _gpu_names()
    tags["hardware.gpu_count"] = str(len(gpus))
    tags["hardware.gpus"] = ", ".join(gpus) if gpus else "none"
    return tags


def _git_commit() -> str:
    here = pathlib.Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else "unknown"


def _gpu_names() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


# --------------------------------------------------------------------------------------------
# Reading runs back.


def _run_dict(run) -> dict[str, Any]:
    info, data = run.info, run.data
    return {"run_id": info.run_id, "name": info.run_name, "status": info.status,
            "experiment_id": info.experiment_id, "params": dict(data.params), "metrics": dict(data.metrics),
            "tags": dict(data.tags), "start_time": info.start_time, "end_time": info.end_time,
            "artifact_uri": info.artifact_uri}


def find_run(uri: str, run_id: str) -> dict[str, Any]:
    """One run: info, params, latest metrics, tags, artifact URI (times in ms since the epoch)."""
    client = _client(uri)
    return _run_dict(_get_run(client, uri, run_id))


def download_artifact(uri: str, run_id: str, artifact_path: str, dst: str) -> str:
    """Copy the artifact file or folder `artifact_path` of a run into `dst`; returns the local path."""
    from mlflow.exceptions import MlflowException

    client = _client(uri)
    _get_run(client, uri, run_id)
    os.makedirs(dst, exist_ok=True)
    try:
        return client.download_artifacts(run_id, artifact_path, dst)
    except (MlflowException, OSError) as err:
        have = [f.path for f in client.list_artifacts(run_id)]
        raise UserError(f"run {run_id} has no artifact {artifact_path!r} ({type(err).__name__}); "
                        f"top-level artifacts: {', '.join(have) or 'none'}") from None


def search_runs(uri: str, experiment: str, *, parent_run_id: str | None = None) -> list[dict[str, Any]]:
    """All active runs of `experiment` (only the children of `parent_run_id` if given), oldest first."""
    client = _client(uri)
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
    client = _client(uri)
    _get_run(client, uri, run_id)
    logged = sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)
    return _last_per_step((m.step, m.value) for m in logged)


def _last_per_step(points: Iterable[tuple[int, float]]) -> list[tuple[int, float]]:
    """(step, value) pairs in logging order -> sorted by step, the last value of each step kept."""
    last = dict(points)
    return [(step, last[step]) for step in sorted(last)]
