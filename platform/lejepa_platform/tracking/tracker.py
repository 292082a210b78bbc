"""The `Tracker` interface and its three implementations.

The driver records a run through a `Tracker`: an `MLflowTracker` for real runs, a `NullTracker`
where nothing is recorded and an `InMemoryTracker` in tests. (Rank 0 of the training workers sends
its metric rows through a `MetricsOutbox` instead: outbox.py says why.)
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import Any, Protocol

from lejepa_platform.batching import chunks
from lejepa_platform.console import warn
from lejepa_platform.errors import TrackingError, UserError
from lejepa_platform.redact import redact_params
from lejepa_platform.tracking.outbox import STAMP, STEP, last_step, send_rows, send_tags, stamped
from lejepa_platform.tracking.runs import last_per_step, metric_history
from lejepa_platform.tracking.store import (PARAMS_PER_BATCH, PARENT_TAG, STATUSES, TAG_VALUE_LIMIT,
                                            experiment_id_for, get_run, open_client, prepare_params, send_metrics,
                                            wait_for_server)


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

    def deliver(self, rows: list[dict[str, float]], step_key: str, wait_s: float = 0.0) -> int: ...


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

    def deliver(self, rows: list[dict[str, float]], step_key: str, wait_s: float = 0.0) -> int:
        return 0


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
        self.dicts[name] = json.loads(json.dumps(redact_params(obj), default=str))

    def finish(self, status: str = "FINISHED") -> None:
        self.status = _check_status(status)

    def history(self, key: str) -> list[tuple[int, float]]:
        return last_per_step(self.metrics.get(key, []))

    def deliver(self, rows: list[dict[str, float]], step_key: str, wait_s: float = 0.0) -> int:
        last = max((step for step, _ in self.history(step_key)), default=0)
        new = [row for row in rows if int(row[STEP]) > last]
        for row in new:
            self.log_metrics({k: v for k, v in row.items() if k not in (STEP, STAMP)}, int(row[STEP]))
        return len(new)


class MLflowTracker:
    """One MLflow run, written through an explicit client; create it with `MLflowTracker.start`.
    """

    def __init__(self, client, tracking_uri: str, experiment_id: str, run_id: str) -> None:
        self.open_client = client
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.run_id: str | None = run_id

    @classmethod
    def start(cls, uri: str, experiment: str, *, run_name: str | None = None, run_id: str | None = None,
              parent_run_id: str | None = None, tags: dict | None = None) -> MLflowTracker:
        """Create a run in `experiment` (created if missing), or resume `run_id` (status back to RUNNING).

        `parent_run_id` nests the run under a parent (sweep trials under the sweep's run).
        """
        client = open_client(uri)
        all_tags = dict(tags or {})
        if parent_run_id:
            get_run(client, uri, parent_run_id)
            all_tags[PARENT_TAG] = parent_run_id
        if run_id:
            run = get_run(client, uri, run_id)
            client.update_run(run_id, status="RUNNING")
            tracker = cls(client, uri, run.info.experiment_id, run_id)
            tracker.set_tags(all_tags)
            return tracker
        experiment_id = experiment_id_for(client, uri, experiment)
        run = client.create_run(experiment_id, tags=prepare_params(all_tags, TAG_VALUE_LIMIT), run_name=run_name or None)
        return cls(client, uri, experiment_id, run.info.run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params in batches. On a resumed run, values already logged are skipped and changed
        ones (MLflow params are immutable) are kept as `resumed.<key>` tags and reported on stderr."""
        from mlflow.entities import Param

        prepared = prepare_params(params)
        existing = self.open_client.get_run(self.run_id).data.params
        changed = {k: v for k, v in prepared.items() if k in existing and existing[k] != v}
        new = [Param(k, v) for k, v in prepared.items() if k not in existing]
        for chunk in chunks(new, PARAMS_PER_BATCH):
            self.open_client.log_batch(self.run_id, params=chunk)
        if changed:
            warn(f"tracking: run {self.run_id} already has different values for {', '.join(sorted(changed))}; "
                 "the new values are recorded as resumed.* tags")
            self.set_tags({f"resumed.{k}": v for k, v in changed.items()})

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        send_metrics(self.open_client, self.run_id, metrics, step)

    def set_tags(self, tags: dict[str, str]) -> None:
        send_tags(self.open_client, self.run_id, tags)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        if not os.path.exists(path):
            raise UserError(f"artifact {path!r} does not exist")
        if os.path.isdir(path):
            self.open_client.log_artifacts(self.run_id, path, artifact_path)
        else:
            self.open_client.log_artifact(self.run_id, path, artifact_path)

    def log_dict(self, obj: dict, name: str) -> None:
        """Write `obj`, secrets masked (redact.py), as JSON to the artifact file `name` (e.g. "config.json")."""
        with tempfile.TemporaryDirectory() as tmp:
            target = pathlib.Path(tmp) / pathlib.PurePosixPath(name).name
            target.write_text(json.dumps(redact_params(obj), indent=2, sort_keys=True, default=str))
            parent = str(pathlib.PurePosixPath(name).parent)
            self.open_client.log_artifact(self.run_id, str(target), None if parent == "." else parent)

    def finish(self, status: str = "FINISHED") -> None:
        self.open_client.set_terminated(self.run_id, _check_status(status))

    def deliver(self, rows: list[dict[str, float]], step_key: str, wait_s: float = 0.0) -> int:
        """Send the metric rows (each with a "step") past the run's last `step_key` step, after
        waiting up to `wait_s` for a server that does not answer; returns how many were sent. Rows
        the store already holds with the same stamps are stored once (outbox.py)."""
        wait_for_server(self.tracking_uri, wait_s)
        last = last_step(self.open_client, self.run_id, step_key)
        new = [stamped(row) for row in rows if int(row[STEP]) > last]
        send_rows(self.open_client, self.run_id, new, last)
        return len(new)

    @contextlib.contextmanager
    def failed_on_error(self) -> Iterator[None]:
        """Inside: anything raised marks the run FAILED first (when the store still answers), so a
        run whose set-up failed is not left looking alive."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(TrackingError):
                self.finish("FAILED")
            raise

    def history(self, key: str) -> list[tuple[int, float]]:
        return metric_history(self.tracking_uri, self.run_id, key)
